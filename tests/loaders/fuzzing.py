"""Fuzz targets for the readers of untrusted files, shared by CI and `make fuzz`.

Each target is a plain property plus the strategy that feeds it: a small valid file of
the format (a safetensors file, a GGUF file, a torch.save zip or legacy pickle, an index
json) with a few random edits (bytes set, integers planted where lengths and counts
live, ranges cut or repeated, the file truncated). The property: the reader either
parses it (and then every record reads back within its file) or raises one of
weightserve's errors, with a message that shows no server directory and does not
come from a failed allocation. Any other exception is a bug.

tests/loaders/test_fuzz_targets.py runs each for a few hundred examples; fuzz/ runs the
same targets for FUZZ_SECONDS each under a memory cap (`make fuzz`).
"""

from __future__ import annotations

import atexit
import functools
import io
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from hypothesis import strategies as st
from safetensors.torch import save

from weightserve.errors import CorruptCheckpointError, ModelNotFoundError, PreconditionError, UnsafeCheckpointError
from weightserve.loaders.base import Loader
from weightserve.loaders.discovery import check_index, files_from_index
from weightserve.loaders.gguf import GGUFLoader
from weightserve.loaders.safetensors import SafetensorsLoader
from weightserve.loaders.torch_pickle import TorchLoader
from weightserve.storage.selection import SAFETENSORS_INDEX, names_from_index

ALLOWED = (CorruptCheckpointError, UnsafeCheckpointError, PreconditionError, ModelNotFoundError)
"""What a reader may raise for a hostile file; anything else is a bug."""

INTERESTING = (
    0,
    1,
    2,
    7,
    8,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0x7FFF,
    0xFFFF,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**63 - 1,
    2**64 - 1,
)
"""Integers planted where a length, count, offset or type tag may live."""


@functools.cache
def scratch() -> Path:
    """A directory of this process's own for the files under test, removed at exit."""
    path = Path(tempfile.mkdtemp(prefix="weightserve-fuzz-"))
    atexit.register(shutil.rmtree, path, True)
    return path


@contextmanager
def only_our_errors(where: Path) -> Iterator[None]:
    """Let through only weightserve's errors, each with a message fit for a client."""
    try:
        yield
    except ALLOWED as e:
        message = str(e)
        assert message, f"{type(e).__name__} without a message"
        assert str(where) not in message, f"message shows a server directory: {message}"
        assert "allocate" not in message.lower(), f"the reader tried a huge allocation: {message}"


def read_every_record(loader: Loader) -> None:
    """Read each record's bytes: a parsed file's ranges must all lie inside its sources."""
    for record in loader.records:
        buf = bytearray(min(record.nbytes, 1 << 20))
        loader.sources[record.source].read_into(record.offset, memoryview(buf))


# ------------------------------------------------------------------ mutations


@st.composite
def mutated(draw: st.DrawFn, seed: bytes, hot: int = 256, max_edits: int = 4) -> bytes:
    """`seed` after 1..max_edits random edits, half of them within its first `hot` bytes."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(min_value=1, max_value=max_edits))):
        if not data:
            break
        end = len(data) - 1
        at = draw(st.integers(min_value=0, max_value=min(hot, end)) | st.integers(min_value=0, max_value=end))
        kind = draw(st.sampled_from(("byte", "int", "nudge", "cut", "repeat", "truncate")))
        if kind == "byte":
            data[at] = draw(st.integers(min_value=0, max_value=255))
        elif kind == "int":
            width = draw(st.sampled_from((1, 2, 4, 8)))
            value = draw(st.sampled_from(INTERESTING)) % (1 << (8 * width))
            data[at : at + width] = value.to_bytes(width, "little")
        elif kind == "nudge":  # a length or count off by a little
            width = draw(st.sampled_from((4, 8)))
            if at + width <= len(data):
                value = int.from_bytes(data[at : at + width], "little") + draw(st.integers(-9, 9))
                data[at : at + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
        elif kind == "cut":
            del data[at : at + draw(st.integers(min_value=1, max_value=64))]
        elif kind == "repeat":
            data[at:at] = data[at : at + draw(st.integers(min_value=1, max_value=64))]
        else:
            del data[at:]
    return bytes(data)


def write(name: str, blob: bytes, folder: str = "files") -> Path:
    path = scratch() / folder / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(blob)
    return path


# ---------------------------------------------------------------- safetensors


@functools.cache
def safetensors_seed() -> bytes:
    tensors = {
        "embed": torch.arange(12, dtype=torch.float32).reshape(3, 4).to(torch.bfloat16),
        "ids": torch.arange(5, dtype=torch.int64),
        "empty": torch.zeros(0, 2, dtype=torch.float16),
        "scalar": torch.tensor(3, dtype=torch.int8),
    }
    return save(tensors, {"format": "pt"})


def safetensors_target(blob: bytes) -> None:
    """A mutated safetensors file, through read_header and the loader."""
    path = write("model.safetensors", blob)
    with only_our_errors(scratch()), SafetensorsLoader([path]) as loader:
        read_every_record(loader)


def safetensors_files() -> st.SearchStrategy[bytes]:
    return mutated(safetensors_seed(), hot=256)


# ----------------------------------------------------------------------- GGUF


@functools.cache
def gguf_seed() -> bytes:
    """A ~2 KB Llama GGUF: scalar and array metadata, F32/F16/Q8_0 tensors, a permuted attn_q."""
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFWriter
    from gguf.quants import quantize

    path = scratch() / "seed.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_vocab_size(4)
    writer.add_token_list(["<s>", "</s>", "a", "b"])
    writer.add_rope_freq_base(10000.0)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((4, 8)).astype(np.float16))
    writer.add_tensor("blk.0.attn_q.weight", rng.standard_normal((8, 8)).astype(np.float32))
    q8 = quantize(rng.standard_normal((2, 32)).astype(np.float32), T.Q8_0)
    writer.add_tensor("blk.0.ffn_up.weight", q8, raw_dtype=T.Q8_0)
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    blob = path.read_bytes()
    path.unlink()
    return blob


def gguf_target(blob: bytes) -> None:
    """A mutated GGUF file, through the gguf package's reader and our records."""
    path = write("model.gguf", blob)
    with only_our_errors(scratch()), GGUFLoader([path]) as loader:
        read_every_record(loader)
        loader.model_config_dict()


def gguf_files() -> st.SearchStrategy[bytes]:
    return mutated(gguf_seed(), hot=1024)


# ---------------------------------------------------------------------- torch


@functools.cache
def torch_seed(zip_format: bool) -> bytes:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "a": base,
        "a_t": base[1:3].t(),  # a strided view of a's storage
        "ids": torch.arange(5, dtype=torch.int64),
        "nested": {"bias": torch.ones(3, dtype=torch.float16)},
    }
    out = io.BytesIO()
    torch.save(state, out, _use_new_zipfile_serialization=zip_format)
    return out.getvalue()


def torch_target(blob: bytes) -> None:
    """A mutated torch.save file, through torch's weights-only unpickler and our checks."""
    path = write("pytorch_model.bin", blob)
    with only_our_errors(scratch()), TorchLoader([path]) as loader:
        read_every_record(loader)


def torch_files(zip_format: bool) -> st.SearchStrategy[bytes]:
    seed = torch_seed(zip_format)
    # Zip: its pickle and directory sit at the end; legacy: everything but the data is near the start.
    return mutated(seed, hot=len(seed) if zip_format else 512)


# ---------------------------------------------------------------- index json

_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
)
_json = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_file_names = st.sampled_from(
    ["a.safetensors", "b.safetensors", "missing.safetensors", "../a.safetensors", "/etc/passwd", "", ".", "x/y", "a\0b"]
) | st.text(max_size=12)


@functools.cache
def index_seed() -> str:
    weight_map = {"x": "a.safetensors", "y": "b.safetensors", "z": "b.safetensors"}
    return json.dumps({"metadata": {"total_size": 12}, "weight_map": weight_map}, indent=2)


def index_texts() -> st.SearchStrategy[str]:
    """Index json text: plausible ones, arbitrary JSON, and byte-mutated valid ones."""
    plausible = st.fixed_dictionaries(
        {},
        optional={
            "weight_map": st.dictionaries(st.text(max_size=6), _file_names | _json, max_size=5) | _json,
            "metadata": _json,
        },
    ).map(json.dumps)
    raw = mutated(index_seed().encode(), hot=4096).map(lambda b: b.decode("utf-8", "surrogateescape"))
    return plausible | _json.map(json.dumps) | raw


@functools.cache
def index_dir() -> Path:
    folder = scratch() / "indexed"
    folder.mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        (folder / name).write_bytes(b"")
    return folder


def index_target(text: str) -> None:
    """An index json through files_from_index, check_index and names_from_index."""
    folder = index_dir()
    (folder / SAFETENSORS_INDEX).write_bytes(text.encode("utf-8", "surrogateescape"))
    with only_our_errors(scratch()):
        files = files_from_index(folder, SAFETENSORS_INDEX)
        assert files is not None
        assert all(p.parent == folder and p.is_file() for p in files)
    with only_our_errors(scratch()):
        check_index(folder, SAFETENSORS_INDEX, {"x": "a.safetensors", "y": "b.safetensors", "z": "b.safetensors"})
    with only_our_errors(scratch()):
        names = names_from_index(text, SAFETENSORS_INDEX)
        assert all(len(PurePosixPath(n).parts) == 1 and n not in ("..", "/") for n in names)
