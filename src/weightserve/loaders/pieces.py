"""Pieces: runs of bytes in a loader's sources, and reading them into a buffer.

A served tensor (whole, sliced for a rank, or fused from parts) is a sequence of
pieces. A piece is a run of rows in one source (one row for a contiguous range;
several, `stride` apart, for a slice along a later dim) or a run of zeros (vocabulary
padding), so any slice is read straight from the file without materialising the
tensor it comes from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from weightserve.loaders.sources import Source

ZEROS = -1
"""Piece.source for bytes that are zero (padding), read from nowhere."""


@dataclass(frozen=True)
class Piece:
    """`rows` runs of `row_bytes` bytes, `stride` apart, from `offset` in source `source`."""

    source: int
    offset: int
    row_bytes: int
    rows: int = 1
    stride: int = 0

    @property
    def nbytes(self) -> int:
        return self.row_bytes * self.rows


class HasPieces(Protocol):
    """Anything made of pieces (a TensorPlan)."""

    @property
    def pieces(self) -> tuple[Piece, ...]: ...


def read_range(plan: HasPieces, sources: Sequence[Source], start: int, dest: memoryview) -> None:
    """Fill `dest` with bytes [start, start + len(dest)) of the pieces laid end to end."""
    want_end = start + len(dest)
    base = 0  # offset of the current piece within the tensor
    for piece in plan.pieces:
        lo, hi = max(start, base), min(want_end, base + piece.nbytes)
        if lo < hi:
            _read_piece(piece, sources, lo - base, dest[lo - start : hi - start])
        base += piece.nbytes
        if base >= want_end:
            break


def _read_piece(piece: Piece, sources: Sequence[Source], at: int, dest: memoryview) -> None:
    if piece.source == ZEROS:
        dest[:] = bytes(len(dest))
        return
    source = sources[piece.source]
    if piece.rows == 1:
        source.read_into(piece.offset + at, dest)
        return
    # Gather row by row, so only the rank's bytes are read: a partial first row, whole
    # rows in one tight loop, a partial last row.
    row, col = divmod(at, piece.row_bytes)
    done = 0
    if col:
        done = min(piece.row_bytes - col, len(dest))
        source.read_into(piece.offset + row * piece.stride + col, dest[:done], check=False)
        row += 1
    whole = (len(dest) - done) // piece.row_bytes
    if whole:
        end = done + whole * piece.row_bytes
        source.read_rows(piece.offset + row * piece.stride, piece.row_bytes, piece.stride, dest[done:end])
        done, row = end, row + whole
    if done < len(dest):
        source.read_into(piece.offset + row * piece.stride, dest[done:], check=False)
    source.check_unchanged()
