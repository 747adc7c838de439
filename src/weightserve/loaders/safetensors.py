"""Safetensors reader that parses the header itself and maps tensors to byte ranges.

The header is untrusted input: every bound is checked before anything is read, so a
hostile file gets a CorruptCheckpointError that names the problem, not a huge
allocation or a read past the end.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightserve.errors import CorruptCheckpointError
from weightserve.loaders import register_loader
from weightserve.loaders.base import Loader, TensorRecord
from weightserve.loaders.discovery import check_index, files_by_suffix, files_from_index
from weightserve.loaders.sources import FileSource
from weightserve.storage.selection import SAFETENSORS_INDEX
from weightserve.wire import DTYPE_SIZES

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""The safetensors reference implementation's own bound."""

INDEX_NAME = SAFETENSORS_INDEX


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors header, offsets relative to the file start."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise CorruptCheckpointError(f"header repeats the key {dup!r}")
    return dict(pairs)


def _parse_entry(name: str, spec: Any, data_start: int, data_len: int) -> HeaderEntry:
    if not isinstance(spec, dict):
        raise CorruptCheckpointError(f"tensor {name!r}: header entry is not an object")
    dtype = spec.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise CorruptCheckpointError(f"tensor {name!r}: unknown dtype {dtype!r}")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CorruptCheckpointError(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    offsets = spec.get("data_offsets")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
        raise CorruptCheckpointError(f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise CorruptCheckpointError(f"tensor {name!r}: data_offsets [{begin}, {end}] are out of order")
    if end > data_len:
        raise CorruptCheckpointError(
            f"tensor {name!r}: data_offsets end {end} is past the data section ({data_len} bytes)"
        )
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if nbytes != end - begin:
        raise CorruptCheckpointError(
            f"tensor {name!r}: shape {shape} x {dtype} is {nbytes} bytes but its range holds {end - begin}"
        )
    return HeaderEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def parse_header(prefix: bytes, file_size: int) -> tuple[list[HeaderEntry], dict[str, str]]:
    """Validate a safetensors header and return its entries sorted by offset.

    Args:
        prefix: the first bytes of the file, at least 8 + header length of them.
        file_size: the file's size, to bound the header and every range.

    Returns:
        The tensor entries (offsets from the start of the file) and `__metadata__`.

    Raises:
        CorruptCheckpointError: anything about the header is wrong.
    """
    if file_size < 8 or len(prefix) < 8:
        raise CorruptCheckpointError(f"file of {file_size} bytes is too short for a safetensors header")
    (header_len,) = struct.unpack("<Q", prefix[:8])
    if header_len > MAX_HEADER_BYTES:
        raise CorruptCheckpointError(f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte bound")
    if 8 + header_len > file_size:
        raise CorruptCheckpointError(f"header length {header_len} runs past the end of a {file_size}-byte file")
    if len(prefix) < 8 + header_len:
        raise CorruptCheckpointError("header was cut short while reading")
    try:
        header = json.loads(prefix[8 : 8 + header_len], object_pairs_hook=_reject_duplicates)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CorruptCheckpointError(f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptCheckpointError("__metadata__ must map strings to strings")
    data_start = 8 + header_len
    data_len = file_size - data_start
    entries = sorted(
        (_parse_entry(name, spec, data_start, data_len) for name, spec in header.items()),
        key=lambda e: (e.begin, e.end),
    )
    cursor = data_start
    for entry in entries:
        if entry.begin < cursor:
            raise CorruptCheckpointError(f"tensor {entry.name!r}: byte range overlaps the previous tensor")
        if entry.begin > cursor:
            raise CorruptCheckpointError(f"tensor {entry.name!r}: {entry.begin - cursor} unindexed bytes before it")
        cursor = entry.end
    if cursor != file_size:
        raise CorruptCheckpointError(f"{file_size - cursor} bytes after the last tensor are not indexed by the header")
    return entries, metadata


def read_header(source: FileSource) -> tuple[list[HeaderEntry], dict[str, str]]:
    """Read and validate the header of an open safetensors file (each byte read once)."""
    if source.size < 8:
        raise CorruptCheckpointError(f"{source.label}: {source.size} bytes is too short for safetensors")
    head = bytearray(8)
    source.read_into(0, memoryview(head))
    (header_len,) = struct.unpack("<Q", head)
    try:
        if header_len > MAX_HEADER_BYTES or 8 + header_len > source.size:
            parse_header(bytes(head), source.size)  # raises with the precise reason
        prefix = head + bytearray(header_len)
        source.read_into(8, memoryview(prefix)[8:])
        return parse_header(bytes(prefix), source.size)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"{source.label}: {e}") from None


@register_loader("safetensors")
class SafetensorsLoader(Loader):
    """Serves `*.safetensors` files, or exactly the files an index json names."""

    def __init__(self, files: list[Path]) -> None:
        super().__init__(files)
        self.metadata: dict[str, dict[str, str]] = {}
        file_of: dict[str, str] = {}
        try:
            for path in files:
                source = FileSource(path)
                self.sources.append(source)
                entries, self.metadata[path.name] = read_header(source)
                index = len(self.sources) - 1
                self.records += [
                    TensorRecord(e.name, e.dtype, e.shape, index, e.begin, e.end - e.begin) for e in entries
                ]
                file_of.update(dict.fromkeys((e.name for e in entries), path.name))
            self._check_unique_names()
            if files:
                check_index(files[0].parent, INDEX_NAME, file_of)
        except BaseException:
            self.close()
            raise

    @classmethod
    def find_files(cls, model_dir: Path) -> list[Path]:
        indexed = files_from_index(model_dir, INDEX_NAME)
        if indexed is not None:
            return indexed
        return files_by_suffix(model_dir, (".safetensors",))
