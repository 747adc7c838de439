"""The fuzz targets of tests/loaders/fuzzing.py, a few hundred examples each.

`make fuzz` runs the same targets for minutes under a memory cap; these keep CI on them.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.loaders import fuzzing
from weightserve.errors import CorruptCheckpointError
from weightserve.loaders.access import without_dirs
from weightserve.loaders.discovery import files_from_index
from weightserve.loaders.gguf import GGUFLoader
from weightserve.loaders.torch_pickle import TorchLoader
from weightserve.storage.selection import SAFETENSORS_INDEX, names_from_index

SHORT = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def short(target: Callable[[bytes], None], strategy: st.SearchStrategy[bytes]) -> None:
    SHORT(given(strategy)(target))()


@pytest.mark.fault("fuzzed checkpoint of any format (short campaign)")
def test_safetensors_files() -> None:
    short(fuzzing.safetensors_target, fuzzing.safetensors_files())


@pytest.mark.fault("fuzzed checkpoint of any format (short campaign)")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the reader's offset sums wrap
def test_gguf_files() -> None:
    short(fuzzing.gguf_target, fuzzing.gguf_files())


@pytest.mark.fault("fuzzed checkpoint of any format (short campaign)")
@pytest.mark.filterwarnings("ignore::UserWarning:torch")
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_files(zip_format: bool) -> None:
    short(fuzzing.torch_target, fuzzing.torch_files(zip_format))


@pytest.mark.fault("fuzzed checkpoint of any format (short campaign)")
def test_index_json() -> None:
    short(fuzzing.index_target, fuzzing.index_texts())


def test_the_seeds_parse() -> None:
    # A mutation that changes nothing must pass: the seeds themselves are valid files.
    fuzzing.safetensors_target(fuzzing.safetensors_seed())
    fuzzing.gguf_target(fuzzing.gguf_seed())
    fuzzing.torch_target(fuzzing.torch_seed(True))
    fuzzing.torch_target(fuzzing.torch_seed(False))
    fuzzing.index_target(fuzzing.index_seed())


# -------------------------------------------------- what the fuzzer found, pinned
# Each of these was an exception other than weightserve's (INTERNAL to a client, and a
# ListModels that failed for every model), a hang or an unbounded allocation.


@pytest.mark.fault("malformed or lying index json")
def test_index_naming_a_file_name_too_long_for_the_os_is_corrupt(tmp_path: Path) -> None:
    # Path.is_file raised OSError(ENAMETOOLONG), out of every listing.
    index = {"weight_map": {"w": "x" * 300 + ".safetensors"}}
    (tmp_path / SAFETENSORS_INDEX).write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match=r"names 'xxx.*\.\.\. \(312 characters\), which does not exist"):
        files_from_index(tmp_path, SAFETENSORS_INDEX)


@pytest.mark.fault("malformed or lying index json")
def test_index_that_is_not_utf8_is_corrupt(tmp_path: Path) -> None:
    (tmp_path / SAFETENSORS_INDEX).write_bytes(b'\x80{"weight_map": {}}')
    with pytest.raises(CorruptCheckpointError, match=r"not a valid index json \(UnicodeDecodeError"):
        files_from_index(tmp_path, SAFETENSORS_INDEX)


def torch_zip(tmp_path: Path) -> tuple[Path, bytearray]:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"a": torch.arange(4.0)}, path)
    return path, bytearray(path.read_bytes())


@pytest.mark.fault("corrupt or truncated .bin/.pt")
def test_zip_directory_that_torch_reads_but_zipfile_refuses_is_corrupt(tmp_path: Path) -> None:
    # "version needed to extract" 25.5 in the first central directory entry: torch's
    # reader ignores it, zipfile raised NotImplementedError.
    path, blob = torch_zip(tmp_path)
    blob[blob.find(b"PK\x01\x02") + 6] = 0xFF
    path.write_bytes(blob)
    torch.load(path, weights_only=True, mmap=True)  # torch still reads it
    with pytest.raises(CorruptCheckpointError, match=r"pytorch_model\.bin: its zip directory is damaged"):
        TorchLoader([path])


@pytest.mark.fault("corrupt or truncated .bin/.pt")
def test_zip_claiming_several_disks_is_corrupt(tmp_path: Path) -> None:
    # zipfile.is_zipfile raised BadZipFile instead of answering.
    path, blob = torch_zip(tmp_path)
    locator = blob.rfind(b"PK\x06\x07")
    blob[locator + 16 : locator + 20] = struct.pack("<I", 2)
    path.write_bytes(blob)
    with pytest.raises(CorruptCheckpointError, match=r"spans? multiple disks|its zip directory is damaged"):
        TorchLoader([path])


def gguf_file(tmp_path: Path, tensors: dict[str, np.ndarray], array: list[bool] | None = None) -> Path:
    from gguf import GGUFWriter

    path = tmp_path / "model.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    if array is not None:
        writer.add_array("test.array", array)
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.fault("hostile GGUF header")
def test_gguf_array_claiming_more_elements_than_the_file_holds_is_corrupt_not_a_hang(tmp_path: Path) -> None:
    # The gguf reader looped 2**60 times past the end of the file, growing a list until OOM
    # (with 1-byte elements the reader never meets a partial one, which would stop it).
    path = gguf_file(tmp_path, {"output_norm.weight": np.ones(4, np.float32)}, array=[True, False, True])
    blob = bytearray(path.read_bytes())
    at = blob.find(b"test.array") + len(b"test.array") + 8  # after the key: array type, element type
    assert struct.unpack("<Q", blob[at : at + 8]) == (3,)
    blob[at : at + 8] = struct.pack("<Q", 2**60)
    path.write_bytes(blob)
    with pytest.raises(
        CorruptCheckpointError,
        match=rf"model\.gguf: metadata 'test\.array' claims an array of {2**60} elements \({2**60} bytes\)",
    ):
        GGUFLoader([path])


@pytest.mark.parametrize("shape", [(0, 8), (1 << 26, 0)], ids=["no-rows", "zero-width-rows"])
def test_gguf_empty_permuted_tensor(tmp_path: Path, shape: tuple[int, int]) -> None:
    # (0, 8): ZeroDivisionError. (2**26, 0): a 512 MiB row table (2 GiB with temporaries)
    # for a tensor of no bytes. Both are empty tensors with nothing to reorder.
    path = gguf_file(tmp_path, {"blk.0.attn_q.weight": np.zeros(shape, np.float32)})
    with GGUFLoader([path]) as loader:
        (record,) = loader.records
        assert (record.shape, record.nbytes) == (shape, 0)


def test_torch_errors_that_quote_the_full_path_show_only_the_base_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch's "<full path> is a zip archive (did you mean to use torch.jit.load()?)",
    # met by a mutated file, reached clients with the server's directories in it.
    path, _ = torch_zip(tmp_path)

    def load(f: object, *args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{f} is a zip archive (did you mean to use torch.jit.load()?)")

    monkeypatch.setattr(torch, "load", load)
    with pytest.raises(CorruptCheckpointError) as info:
        TorchLoader([path])
    assert str(info.value) == (
        "pytorch_model.bin: cannot read torch checkpoint: pytorch_model.bin is a zip archive "
        "(did you mean to use torch.jit.load()?)"
    )


def test_without_dirs() -> None:
    path = Path("/srv/models/org/m/model.gguf")
    assert without_dirs(f"cannot map {path}; see /srv/models/org/m/other", path) == "cannot map model.gguf; see other"


@pytest.mark.fault("malformed or lying index json")
def test_names_from_index_with_nesting_past_the_recursion_limit() -> None:
    with pytest.raises(CorruptCheckpointError):
        names_from_index('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}", SAFETENSORS_INDEX)


@pytest.mark.fault("malformed or lying index json")
def test_files_from_index_with_nesting_past_the_recursion_limit(tmp_path: Path) -> None:
    (tmp_path / SAFETENSORS_INDEX).write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(CorruptCheckpointError, match=r"not a valid index json \(RecursionError"):
        files_from_index(tmp_path, SAFETENSORS_INDEX)


@pytest.mark.fault("hostile sharded_state metadata")
@pytest.mark.parametrize("world_size", ["Infinity", str(10**15)])
def test_sharded_state_metadata_with_an_absurd_world_size(tmp_path: Path, world_size: str) -> None:
    # Infinity: OverflowError from int(); 10**15: a list of that many ranks to compare with.
    from safetensors.torch import save_file

    from weightserve.loaders.sharded_state import METADATA_NAME, ShardedStateLoader

    save_file({"w": torch.arange(4.0)}, str(tmp_path / "model-rank-0-part-0.safetensors"))
    (tmp_path / METADATA_NAME).write_text(f'{{"world_size": {world_size}, "layout": "hf"}}')
    with pytest.raises(CorruptCheckpointError, match=r"not valid sharded-state metadata|saved for world_size"):
        ShardedStateLoader(ShardedStateLoader.find_files(tmp_path))
