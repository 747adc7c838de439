"""TensorPlan: one tensor as a rank receives it, made of pieces of the checkpoint's files.

A plan never holds tensor bytes; `weightserve.loaders.pieces.read_range` reads any
range of it. The planning modules (slicing, layouts, experts, stages) all build on
this type, and `plan.py` composes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from weightserve.loaders.base import TensorRecord
from weightserve.loaders.pieces import Piece


@dataclass(frozen=True)
class TensorPlan:
    """One tensor as a rank receives it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]

    @cached_property
    def nbytes(self) -> int:
        """Bytes the rank receives (worked out once: every stream and grant asks for it)."""
        return sum(p.nbytes for p in self.pieces)


def whole_tensor(record: TensorRecord) -> TensorPlan:
    """The plan that serves a record unsliced."""
    pieces = (Piece(record.source, record.offset, record.nbytes),) if record.nbytes else ()
    return TensorPlan(record.name, record.dtype, record.shape, pieces)
