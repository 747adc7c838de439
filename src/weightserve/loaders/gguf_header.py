"""A bounds check of a GGUF file's metadata, before the gguf package parses it.

The gguf package's reader (0.19) walks a metadata array element by element up to the
count the file states, and past the end of the file an element reads as zero bytes
without an error. So a 2 KB file whose array claims 2**60 elements keeps the reader
looping, and growing a list, until the server is OOM-killed. This walk checks every
length and count against the bytes left first: once it passes, each element the reader
visits lies in the file, and the reader ends within it. Arrays nest at most
MAX_NESTING deep (the reader recurses per level). Files of another GGUF version, or
not GGUF at all, are left to the reader to refuse.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

from weightserve.errors import CorruptCheckpointError

SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
"""GGUF value type -> byte size, for the fixed-size types (u8 ... f64, bool)."""
STRING, ARRAY = 8, 9
MIN_TENSOR_INFO = 8 + 4 + 4 + 8
"""Smallest tensor entry: an empty name's length, n_dims 0, the type and the offset."""
MAX_NESTING = 8


class _Walk:
    """A forward walk over the metadata of an open GGUF file of `size` bytes."""

    def __init__(self, f: BinaryIO, size: int, label: str, order: str) -> None:
        self.f, self.size, self.label, self.order = f, size, label, order
        self.key = ""

    def need(self, nbytes: int, what: str) -> None:
        left = self.size - self.f.tell()
        if nbytes > left:
            where = f"metadata {self.key!r}" if self.key else "header"
            raise CorruptCheckpointError(
                f"{self.label}: {where} claims {what} ({nbytes} bytes) with only {left} bytes left in the file"
            )

    def uint(self, width: int) -> int:
        self.need(width, "an integer")
        (value,) = struct.unpack(self.order + ("I" if width == 4 else "Q"), self.f.read(width))
        return int(value)

    def skip(self, nbytes: int, what: str) -> None:
        self.need(nbytes, what)
        self.f.seek(nbytes, 1)

    def string(self) -> None:
        self.skip(self.uint(8), "a string")

    def value(self, vtype: int, depth: int = 0) -> None:
        if vtype in SCALAR_SIZES:
            self.skip(SCALAR_SIZES[vtype], "a value")
        elif vtype == STRING:
            self.string()
        elif vtype == ARRAY:
            self.array(depth)
        else:
            raise CorruptCheckpointError(f"{self.label}: metadata {self.key!r} has unknown type {vtype}")

    def array(self, depth: int) -> None:
        if depth >= MAX_NESTING:
            raise CorruptCheckpointError(f"{self.label}: metadata {self.key!r} nests arrays over {MAX_NESTING} deep")
        itype, count = self.uint(4), self.uint(8)
        if itype in SCALAR_SIZES:
            self.skip(count * SCALAR_SIZES[itype], f"an array of {count} elements")
            return
        # Strings and arrays take at least 8 and 12 bytes each: bound the count before the loop.
        self.need(count * (8 if itype == STRING else 12), f"an array of {count} elements")
        for _ in range(count):
            self.value(itype, depth + 1)


def check_metadata(f: BinaryIO, size: int, label: str) -> None:
    """Check that every length and count in a GGUF v2/v3 header fits in the file.

    Args:
        f: the file, open for reading at any position.
        size: its size in bytes.
        label: its base name, for messages.

    Raises:
        CorruptCheckpointError: names the metadata key (or the header) that overruns.
    """
    f.seek(0)
    if size < 24 or f.read(4) != b"GGUF":
        return
    (version,) = struct.unpack("<I", f.read(4))
    order = "<"
    if version & 0xFFFF == 0:  # written on a big-endian host, as the reader also detects
        order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in (2, 3):
        return
    walk = _Walk(f, size, label, order)
    tensors, entries = walk.uint(8), walk.uint(8)
    walk.need(entries * (8 + 4 + 1), f"{entries} metadata entries")
    for _ in range(entries):
        walk.key = ""
        walk.need(8, "a key")
        key_len = walk.uint(8)
        walk.need(key_len, "a key")
        walk.key = f.read(min(key_len, 200)).decode("utf-8", "replace")
        f.seek(key_len - min(key_len, 200), 1)
        walk.value(walk.uint(4))
    walk.key = ""
    walk.need(tensors * MIN_TENSOR_INFO, f"{tensors} tensor entries")
