"""Bounds on the tensor views a torch pickle describes, checked before anything is copied.

A pickle gives each tensor as a view (offset, shape, stride) of a storage, and nothing
in the format keeps that view small: a stride-0 view of one 4-byte element can claim
2**28 elements. The loader copies every non-contiguous tensor into memory (it has no
byte range in the file to serve), so such a 1.6 KB file would cost 1 GiB of RAM, and
a slightly larger claim an OOM kill. Two rules, over every tensor of a file, before
the first copy:

- a non-empty view stays inside its storage: offset + sum((size_i - 1) * stride_i) + 1
  elements fit in it (torch itself refuses most views that do not, but the loader does
  not rely on it);
- the bytes copied for non-contiguous views, summed over the file, are at most the
  file's size: nothing is materialised beyond the file's own bytes.

Pure functions over numbers, so the rules are tested without torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from weightserve.errors import CorruptCheckpointError


@dataclass(frozen=True)
class View:
    """One tensor of a pickle: a view, in elements, of a storage of `storage_bytes`."""

    name: str
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    itemsize: int
    storage_bytes: int
    contiguous: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


def view_extent(offset: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """Elements of its storage a view reaches, from the storage's start; 0 when empty.

    Example: a 2x3 transpose of a 3x2 matrix (stride (1, 2)) at offset 0 reaches
    0 + 1*1 + 2*2 + 1 = 6 elements.
    """
    if math.prod(shape) == 0:
        return 0
    return offset + sum((size - 1) * step for size, step in zip(shape, stride, strict=True)) + 1


def _check_inside(label: str, view: View) -> None:
    elements = view.storage_bytes // view.itemsize
    if len(view.shape) != len(view.stride) or any(d < 0 for d in view.shape):
        raise CorruptCheckpointError(
            f"{label}: tensor {view.name!r} has shape {list(view.shape)} and stride {list(view.stride)}"
        )
    if view.numel == 0:
        return
    if view.offset < 0 or any(step < 0 for step in view.stride):
        raise CorruptCheckpointError(
            f"{label}: tensor {view.name!r} has offset {view.offset} and stride {list(view.stride)}; "
            "a view may not start before its storage"
        )
    extent = view_extent(view.offset, view.shape, view.stride)
    if extent > elements:
        raise CorruptCheckpointError(
            f"{label}: tensor {view.name!r} (shape {list(view.shape)}, stride {list(view.stride)}, "
            f"offset {view.offset}) needs {extent} elements of its storage, which holds {elements}; "
            "a view may not reach past its storage"
        )


def check_views(label: str, views: Iterable[View], file_size: int) -> None:
    """Refuse a file whose views reach past their storage or would copy more than the file holds.

    Args:
        label: the file's base name, for messages.
        views: every tensor the file holds.
        file_size: the file's size in bytes: the most that copying may hold in memory.

    Raises:
        CorruptCheckpointError: names the first tensor that breaks a rule, with its numbers.
    """
    held = 0
    for view in views:
        _check_inside(label, view)
        if view.contiguous:
            continue
        held += view.nbytes
        if held > file_size:
            raise CorruptCheckpointError(
                f"{label}: tensor {view.name!r} is a strided view of {view.numel} elements ({view.nbytes} bytes) "
                f"over a {view.storage_bytes}-byte storage; copying the file's strided views would hold "
                f"{held} bytes in memory, more than the file's {file_size} bytes"
            )
