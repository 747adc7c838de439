"""Oracle tests: every tensor read through our loaders equals the reference reader's, bit for bit.

The reference readers are safetensors.torch.load_file and torch.load(weights_only=True).
Bytes are compared as `a.reshape(-1).view(torch.uint8)`, so NaN payloads, signed zeros
and float8 bit patterns count.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightserve.errors import CorruptCheckpointError, UnknownFormatError, UnsafeCheckpointError
from weightserve.loaders import loader_for
from weightserve.loaders.base import Loader
from weightserve.loaders.discovery import natural_key
from weightserve.loaders.safetensors import SafetensorsLoader
from weightserve.loaders.sources import FileSource, MemorySource
from weightserve.loaders.torch_pickle import TorchLoader
from weightserve.wire import DTYPE_SIZES, dtype_name, torch_dtype


def _installed_dtypes() -> dict[str, torch.dtype]:
    found = {}
    for name in DTYPE_SIZES:
        try:
            found[name] = torch_dtype(name)
        except CorruptCheckpointError:  # an older torch without, e.g., float8_e8m0fnu
            continue
    return found


TORCH_DTYPES = _installed_dtypes()
"""Every wire dtype the installed torch has."""


def pattern(dtype: torch.dtype, *shape: int) -> torch.Tensor:
    """A deterministic tensor whose bytes are all different-ish: arange over its raw bytes."""
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if dtype == torch.bool:
        return (torch.arange(numel) % 3 == 1).reshape(shape)
    raw = (torch.arange(numel * itemsize) * 7 % 251).to(torch.uint8)
    return raw.view(dtype).reshape(shape)


def raw(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def read_all(loader: Loader) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (dtype, shape, bytes) through the loader's records and sources."""
    out = {}
    for record in loader.records:
        buf = bytearray(record.nbytes)
        loader.sources[record.source].read_into(record.offset, memoryview(buf))
        out[record.name] = (record.dtype, record.shape, bytes(buf))
    return out


def assert_same(ours: dict[str, tuple[str, tuple[int, ...], bytes]], reference: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        dtype, shape, data = ours[name]
        assert dtype == dtype_name(tensor.dtype), name
        assert shape == tuple(tensor.shape), name
        got = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        assert torch.equal(got, raw(tensor)), name


def load_dir(fmt: str, model_dir: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    cls = loader_for(fmt)
    files = cls.find_files(model_dir)
    assert files, f"no {fmt} files found in {model_dir}"
    with cls(files) as loader:
        return read_all(loader)


def torch_reference(*paths: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in paths:
        out.update(torch.load(path, map_location="cpu", weights_only=True))
    return out


def all_dtype_tensors() -> dict[str, torch.Tensor]:
    tensors = {f"t.{name.lower()}": pattern(dtype, 3, 5) for name, dtype in TORCH_DTYPES.items()}
    tensors["t.empty_f32"] = pattern(torch.float32, 0, 4)
    tensors["t.empty_bf16"] = pattern(torch.bfloat16, 4, 0, 2)
    tensors["t.scalar_f32"] = torch.tensor(1.5)
    tensors["t.scalar_i64"] = torch.tensor(-3, dtype=torch.int64)
    tensors["t.bigger"] = torch.arange(5000, dtype=torch.float32).reshape(50, 100)
    return tensors


# ----------------------------------------------------------------------- registry


def test_registry_names_the_loaders() -> None:
    assert loader_for("safetensors") is SafetensorsLoader
    assert loader_for("torch") is TorchLoader
    with pytest.raises(UnknownFormatError, match=r"no loader 'onnx'; have .*safetensors.*torch"):
        loader_for("onnx")


def test_every_wire_dtype_is_available_in_this_torch() -> None:
    # The oracle tests below cover TORCH_DTYPES; with the pinned torch that is all of them.
    if not hasattr(torch, "float8_e8m0fnu"):
        pytest.skip(f"torch {torch.__version__} predates float8_e8m0fnu")
    assert set(TORCH_DTYPES) == set(DTYPE_SIZES)


# -------------------------------------------------------------------- safetensors


def test_safetensors_single_file_every_dtype(tmp_path: Path) -> None:
    tensors = all_dtype_tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"), {"format": "pt"})

    ours = load_dir("safetensors", tmp_path)

    assert_same(ours, load_file(str(tmp_path / "model.safetensors")))
    assert_same(ours, tensors)


def test_safetensors_loader_reports_metadata_and_total_bytes(tmp_path: Path) -> None:
    tensors = {"a": pattern(torch.float16, 4, 4), "b": pattern(torch.int8, 7)}
    save_file(tensors, str(tmp_path / "model.safetensors"), {"format": "pt", "who": "test"})
    with SafetensorsLoader([tmp_path / "model.safetensors"]) as loader:
        assert loader.metadata == {"model.safetensors": {"format": "pt", "who": "test"}}
        assert loader.total_bytes() == 4 * 4 * 2 + 7


def write_sharded(model_dir: Path, tensors: dict[str, torch.Tensor], num_files: int) -> list[Path]:
    names = list(tensors)
    per = math.ceil(len(names) / num_files)
    weight_map, files = {}, []
    for part in range(num_files):
        filename = f"model-{part + 1:05d}-of-{num_files:05d}.safetensors"
        chunk = names[part * per : (part + 1) * per]
        save_file({n: tensors[n] for n in chunk}, str(model_dir / filename))
        weight_map.update(dict.fromkeys(chunk, filename))
        files.append(model_dir / filename)
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


def test_safetensors_sharded_with_index_ignores_a_stray_consolidated_file(tmp_path: Path) -> None:
    tensors = all_dtype_tensors()
    files = write_sharded(tmp_path, tensors, 3)
    # A stray file with clashing names: served, it would be a duplicate-name error.
    save_file({"t.f32": pattern(torch.float32, 2)}, str(tmp_path / "consolidated.safetensors"))

    assert SafetensorsLoader.find_files(tmp_path) == files
    reference: dict[str, torch.Tensor] = {}
    for f in files:
        reference.update(load_file(str(f)))
    assert_same(load_dir("safetensors", tmp_path), reference)


@pytest.mark.fault("malformed or lying index json")
def test_index_naming_a_missing_file_is_corrupt(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(CorruptCheckpointError, match=r"names 'gone.safetensors', which does not exist"):
        SafetensorsLoader.find_files(tmp_path)


@pytest.mark.fault("malformed or lying index json")
@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors"])
def test_index_naming_a_path_outside_the_model_is_corrupt(tmp_path: Path, target: str) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": target}}))
    with pytest.raises(CorruptCheckpointError, match=r"is not a file in the model directory"):
        SafetensorsLoader.find_files(tmp_path)


@pytest.mark.fault("malformed or lying index json")
@pytest.mark.parametrize("text", ["not json", "[]", '{"weight_map": 3}', '{"nothing": {}}'])
def test_malformed_index_is_corrupt(tmp_path: Path, text: str) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CorruptCheckpointError, match=r"not a valid index json"):
        SafetensorsLoader.find_files(tmp_path)


def test_natural_key_orders_numbers_numerically() -> None:
    names = [f"model-{i}-of-10.safetensors" for i in range(1, 11)]
    shuffled = names[:]
    random.Random(0).shuffle(shuffled)
    assert sorted((Path(n) for n in shuffled), key=natural_key) == [Path(n) for n in names]
    assert natural_key(Path("model-2-of-10.safetensors")) < natural_key(Path("model-10-of-10.safetensors"))


def test_find_files_orders_shards_naturally_without_an_index(tmp_path: Path) -> None:
    for i in range(1, 11):
        save_file({f"w{i}": torch.arange(i, dtype=torch.float32)}, str(tmp_path / f"model-{i}-of-10.safetensors"))
    found = [p.name for p in SafetensorsLoader.find_files(tmp_path)]
    assert found == [f"model-{i}-of-10.safetensors" for i in range(1, 11)]
    with SafetensorsLoader(SafetensorsLoader.find_files(tmp_path)) as loader:
        assert [r.name for r in loader.records] == [f"w{i}" for i in range(1, 11)]


def test_find_files_orders_indexed_shards_naturally(tmp_path: Path) -> None:
    weight_map = {}
    for i in (10, 2, 1, 7):
        filename = f"model-{i}-of-10.safetensors"
        save_file({f"w{i}": torch.arange(i, dtype=torch.float32)}, str(tmp_path / filename))
        weight_map[f"w{i}"] = filename
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    found = [p.name for p in SafetensorsLoader.find_files(tmp_path)]
    assert found == [f"model-{i}-of-10.safetensors" for i in (1, 2, 7, 10)]


@pytest.mark.fault("malformed or lying index json")
def test_same_tensor_name_in_two_files_is_corrupt(tmp_path: Path) -> None:
    save_file({"w": torch.arange(2.0)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.arange(3.0)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(CorruptCheckpointError, match=r"tensor 'w' appears twice"):
        SafetensorsLoader(SafetensorsLoader.find_files(tmp_path))


@pytest.mark.fault("hostile safetensors header")
def test_safetensors_corrupt_header_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    header = b'{"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(CorruptCheckpointError, match=r"model.safetensors: tensor 'w': unknown dtype 'F99'"):
        SafetensorsLoader([path])


@pytest.mark.fault("hostile safetensors header")
@pytest.mark.parametrize("blob", [b"", b"\x01\x02", (10**9).to_bytes(8, "little") + b"{}"])
def test_safetensors_too_short_or_lying_length_is_corrupt(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(blob)
    with pytest.raises(CorruptCheckpointError):
        SafetensorsLoader([path])


# ------------------------------------------------------------- truncated/rewritten


@pytest.mark.fault("checkpoint file truncated while served")
def test_file_truncated_after_open_raises_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    tensors = {"a": pattern(torch.float32, 64), "b": pattern(torch.float32, 64)}
    save_file(tensors, str(path))
    with SafetensorsLoader([path]) as loader:
        last = max(loader.records, key=lambda r: r.offset)
        first = min(loader.records, key=lambda r: r.offset)
        source = loader.sources[last.source]
        os.truncate(path, last.offset + 10)
        with pytest.raises(CorruptCheckpointError, match=r"truncated|changed"):
            source.read_into(last.offset, memoryview(bytearray(last.nbytes)))
        # Bytes that are still there do not make the file unchanged.
        with pytest.raises(CorruptCheckpointError, match=r"changed while being served"):
            source.read_into(first.offset, memoryview(bytearray(first.nbytes)))


@pytest.mark.fault("checkpoint file rewritten in place while served")
def test_file_rewritten_in_place_same_size_new_mtime_raises_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"a": pattern(torch.float32, 64)}, str(path))
    source = FileSource(path)
    try:
        buf = memoryview(bytearray(16))
        source.read_into(0, buf)  # unchanged: fine
        size = path.stat().st_size
        st = path.stat()
        with path.open("r+b") as f:
            f.seek(size - 4)
            f.write(b"\xff\xff\xff\xff")
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
        assert path.stat().st_size == size
        with pytest.raises(CorruptCheckpointError, match=r"changed while being served"):
            source.read_into(0, buf)
    finally:
        source.close()


@pytest.mark.fault(
    "checkpoint file replaced by rename while served",
    expect="streams in flight finish with the old bytes; a write to the unlinked file is still DATA_LOSS",
    cases=2,
)
def test_a_file_replaced_by_rename_still_reads_its_old_bytes_until_written(tmp_path: Path) -> None:
    """Unlinking moves the ctime; same size, mtime and inode with no name left is the old file, whole."""
    path = tmp_path / "blob"
    old = bytes(range(100))
    path.write_bytes(old)
    source = FileSource(path)
    writer = os.open(path, os.O_WRONLY)  # someone who can still write to the old inode
    try:
        fresh = tmp_path / ".blob.new"
        fresh.write_bytes(bytes(100))
        os.replace(fresh, path)  # the safe way to roll out a new checkpoint
        dest = bytearray(100)
        source.read_into(0, memoryview(dest))
        assert bytes(dest) == old
        before = os.fstat(writer)
        time.sleep(0.02)  # past the file system's timestamp granularity
        os.pwrite(writer, b"\xff", 50)
        os.utime(writer, ns=(before.st_atime_ns, before.st_mtime_ns))  # and hide it from the mtime
        with pytest.raises(CorruptCheckpointError, match=r"changed while being served"):
            source.read_into(0, memoryview(dest))
    finally:
        os.close(writer)
        source.close()


def test_file_source_refuses_reads_past_its_size(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(bytes(range(100)))
    source = FileSource(path)
    try:
        dest = bytearray(10)
        source.read_into(90, memoryview(dest))
        assert bytes(dest) == bytes(range(90, 100))
        assert source.bytes_read == 10
        with pytest.raises(CorruptCheckpointError, match=r"past the end \(100 bytes\)"):
            source.read_into(95, memoryview(bytearray(10)))
        with pytest.raises(CorruptCheckpointError):
            source.read_into(-1, memoryview(bytearray(1)))
    finally:
        source.close()


def test_memory_source_reads_and_bounds() -> None:
    source = MemorySource("mem", bytes(range(20)))
    dest = bytearray(5)
    source.read_into(3, memoryview(dest))
    assert bytes(dest) == bytes(range(3, 8))
    with pytest.raises(CorruptCheckpointError, match=r"mem: read of \[18, 23\) past 20 bytes"):
        source.read_into(18, memoryview(bytearray(5)))


# -------------------------------------------------------------------------- torch


def test_pytorch_model_bin_every_dtype(tmp_path: Path) -> None:
    tensors = all_dtype_tensors()
    torch.save(tensors, tmp_path / "pytorch_model.bin")

    ours = load_dir("torch", tmp_path)

    assert_same(ours, torch_reference(tmp_path / "pytorch_model.bin"))
    assert_same(ours, tensors)


def test_zip_checkpoint_is_read_from_the_file_not_held_in_memory(tmp_path: Path) -> None:
    tensors = {"a": pattern(torch.float32, 8, 8), "b": pattern(torch.int16, 5)}
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    with TorchLoader([tmp_path / "pytorch_model.bin"]) as loader:
        assert all(isinstance(loader.sources[r.source], FileSource) for r in loader.records)
        assert_same(read_all(loader), tensors)


def test_sharded_pytorch_model_bin_with_index(tmp_path: Path) -> None:
    tensors = all_dtype_tensors()
    names = list(tensors)
    files = [tmp_path / f"pytorch_model-0000{i}-of-00002.bin" for i in (1, 2)]
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for path, half in zip(files, halves, strict=True):
        torch.save({n: tensors[n] for n in half}, path)
        weight_map.update(dict.fromkeys(half, path.name))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    torch.save({"t.f32": pattern(torch.float32, 2)}, tmp_path / "stray.pt")  # not in the index

    assert TorchLoader.find_files(tmp_path) == files
    assert_same(load_dir("torch", tmp_path), torch_reference(*files))


def test_pt_with_a_non_contiguous_tensor(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "transposed": base.t(),
        "strided": base[:, ::2],
        "contiguous": torch.arange(10, dtype=torch.int32),
    }
    assert not tensors["transposed"].is_contiguous() and not tensors["strided"].is_contiguous()
    torch.save(tensors, tmp_path / "model.pt")

    ours = load_dir("torch", tmp_path)

    assert_same(ours, torch_reference(tmp_path / "model.pt"))
    assert ours["transposed"][1] == (6, 4)
    assert ours["transposed"][2] == raw(base.t()).numpy().tobytes()


def test_tied_and_shared_storage_tensors(tmp_path: Path) -> None:
    embed = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    fused = torch.arange(30, dtype=torch.bfloat16).reshape(3, 10)
    tensors = {
        "embed.weight": embed,
        "lm_head.weight": embed,  # tied: the same tensor twice
        "q": fused[0],  # three views of one storage
        "k": fused[1],
        "v": fused[2],
        "tail": fused.reshape(-1)[7:],  # a view starting mid-storage
    }
    torch.save(tensors, tmp_path / "pytorch_model.bin")

    ours = load_dir("torch", tmp_path)

    assert_same(ours, torch_reference(tmp_path / "pytorch_model.bin"))
    assert ours["lm_head.weight"] == ours["embed.weight"]


LEGACY_UNSUPPORTED = ("f8_", "u16", "u32", "u64")
"""Dtypes torch's own legacy (pre-zip) format cannot load back (no typed storage class)."""


def test_legacy_non_zip_checkpoint(tmp_path: Path) -> None:
    tensors = {k: v for k, v in all_dtype_tensors().items() if not k.removeprefix("t.").startswith(LEGACY_UNSUPPORTED)}
    tensors["t.noncontig"] = torch.arange(12, dtype=torch.float64).reshape(3, 4).t()
    path = tmp_path / "pytorch_model.bin"
    torch.save(tensors, path, _use_new_zipfile_serialization=False)

    ours = load_dir("torch", tmp_path)

    assert_same(ours, torch_reference(path))
    assert_same(ours, tensors)


def test_wrapped_state_dict_is_unwrapped_and_non_tensors_skipped(tmp_path: Path) -> None:
    inner = {"a": torch.arange(3.0), "sub": {"b": torch.arange(2, dtype=torch.int64)}, "step": 7, "note": "x"}
    torch.save({"state_dict": inner}, tmp_path / "model.pt")
    ours = load_dir("torch", tmp_path)
    assert_same(ours, {"a": inner["a"], "sub.b": inner["sub"]["b"]})


def test_training_side_files_are_not_weights(tmp_path: Path) -> None:
    torch.save({"w": torch.arange(4.0)}, tmp_path / "pytorch_model.bin")
    for name in ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state_0.pth", "trainer_state.pt"):
        torch.save({"x": torch.zeros(1)}, tmp_path / name)
    assert TorchLoader.find_files(tmp_path) == [tmp_path / "pytorch_model.bin"]


class Evil:
    """Unpickling this runs a shell command; the loader must never let it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.fault("malicious pickle checkpoint")
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, zip_format: bool) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2), "payload": Evil(marker)}, path, _use_new_zipfile_serialization=zip_format)

    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model.bin: refusing to unpickle: .*(posix|os)\.system"):
        TorchLoader(TorchLoader.find_files(tmp_path))
    assert not marker.exists()


@pytest.mark.fault("malicious pickle checkpoint")
def test_malicious_plain_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    import pickle

    marker = tmp_path / "PWNED"
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"payload": Evil(marker)}, protocol=2))
    with pytest.raises((UnsafeCheckpointError, CorruptCheckpointError)):
        TorchLoader([path])
    assert not marker.exists()


@pytest.mark.fault("corrupt or truncated .bin/.pt")
def test_truncated_zip_bin_is_corrupt(tmp_path: Path) -> None:
    good = tmp_path / "good.bin"
    torch.save({"w": torch.arange(1000, dtype=torch.float32)}, good)
    blob = good.read_bytes()
    for i, cut in enumerate((len(blob) // 2, len(blob) - 10, 100)):
        path = tmp_path / f"cut{i}.bin"
        path.write_bytes(blob[:cut])
        with pytest.raises(CorruptCheckpointError, match=rf"cut{i}.bin: cannot read torch checkpoint"):
            TorchLoader([path])


@pytest.mark.fault("corrupt or truncated .bin/.pt")
def test_truncated_legacy_bin_is_corrupt(tmp_path: Path) -> None:
    good = tmp_path / "good.bin"
    torch.save({"w": torch.arange(1000, dtype=torch.float32)}, good, _use_new_zipfile_serialization=False)
    path = tmp_path / "cut.bin"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match=r"cut.bin"):
        TorchLoader([path])


@pytest.mark.fault("corrupt or truncated .bin/.pt")
def test_empty_bin_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"")
    with pytest.raises(CorruptCheckpointError):
        TorchLoader([path])


@pytest.mark.fault("corrupt or truncated .bin/.pt")
@pytest.mark.parametrize(
    "garbage", [b"this is not a checkpoint at all\n" * 8, b"not a checkpoint" * 8, bytes(range(256))]
)
def test_garbage_bin_is_corrupt_not_unsafe(tmp_path: Path, garbage: bytes) -> None:
    # Bytes that are not a pickle at all are a damaged file (DATA_LOSS), not a pickle
    # asking for code (FAILED_PRECONDITION "refusing to unpickle: it holds more than
    # plain tensors"), which would send the operator looking for an attack.
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(garbage)
    with pytest.raises(CorruptCheckpointError):
        TorchLoader([path])


@pytest.mark.fault("corrupt or truncated .bin/.pt")
def test_zip_bin_with_corrupted_bytes_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.arange(1000, dtype=torch.float32)}, path)
    blob = bytearray(path.read_bytes())
    blob[200:400] = bytes(b ^ 0xFF for b in blob[200:400])
    path.write_bytes(bytes(blob))
    with pytest.raises(CorruptCheckpointError):
        TorchLoader([path])


@pytest.mark.fault("corrupt or truncated .bin/.pt")
def test_torch_file_truncated_after_open_raises_corrupt_on_read(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.arange(4096, dtype=torch.float32)}, path)
    with TorchLoader([path]) as loader:
        (record,) = loader.records
        os.truncate(path, record.offset + 16)
        with pytest.raises(CorruptCheckpointError):
            loader.sources[record.source].read_into(record.offset, memoryview(bytearray(record.nbytes)))
