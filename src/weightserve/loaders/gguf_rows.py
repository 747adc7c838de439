"""Undoing llama.cpp's row permutation of attn_q / attn_k, without reading whole tensors.

convert_hf_to_gguf stores Llama's q and k projections with the rows of each head
interleaved (`w.reshape(n_head, 2, head_dim // 2, ...).swapaxes(1, 2)`), for its
rotary kernel. Hugging Face row `h*hd + j*hd/2 + i` is GGUF row `h*hd + 2*i + j`. The
permutation moves whole rows and never leaves a head, so it works on quantized blocks
too, and a run of Hugging Face rows comes from the same heads' GGUF rows.

`PermutedRows` is a Source in Hugging Face order over a tensor stored in GGUF order.
Its records are plain row-major tensors, so every slicing rule works on it unchanged.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from weightserve.errors import CorruptCheckpointError
from weightserve.loaders.sources import Source


def check_heads(n_rows: int, n_head: int) -> None:
    """Raise CorruptCheckpointError unless `n_rows` split into `n_head` heads of an even size."""
    if n_head <= 0 or n_rows % n_head or (n_rows // n_head) % 2:
        raise CorruptCheckpointError(f"{n_rows} rows do not split into {n_head} heads of an even size")


def gguf_rows(n_rows: int, n_head: int, start: int = 0, stop: int | None = None) -> npt.NDArray[np.int64]:
    """For each Hugging Face row in [start, stop) (default: all), the GGUF row that holds it.

    Raises:
        CorruptCheckpointError: the rows do not split into heads of an even size.
    """
    check_heads(n_rows, n_head)
    head_dim = n_rows // n_head
    hf = np.arange(start, n_rows if stop is None else stop, dtype=np.int64)
    head, within = np.divmod(hf, head_dim)
    half, i = np.divmod(within, head_dim // 2)
    rows: npt.NDArray[np.int64] = head * head_dim + 2 * i + half
    return rows


class PermutedRows(Source):
    """A tensor's bytes in Hugging Face row order, read from its GGUF-ordered rows in `base`.

    A read fetches the smallest run of GGUF rows that holds every row it needs (the
    rows of the heads it touches, at most) in one pread, then reorders them in memory.
    The row map is computed per read, for the rows read: a table of every row would
    cost 8 bytes a row, more than the tensor itself for a hostile file of 1-byte rows.
    """

    def __init__(self, base: Source, offset: int, *, n_rows: int, row_bytes: int, n_head: int, label: str) -> None:
        self.base = base
        self.offset = offset
        self.row_bytes = row_bytes
        self.n_rows, self.n_head = n_rows, n_head
        check_heads(n_rows, n_head)
        self.size = n_rows * row_bytes
        self.label = label
        self.bytes_read = 0  # the base source counts the bytes read from storage

    def read_into(self, offset: int, dest: memoryview, check: bool = True) -> None:
        end = offset + len(dest)
        if offset < 0 or end > self.size:
            raise CorruptCheckpointError(f"{self.label}: read of [{offset}, {end}) past {self.size} bytes")
        if not len(dest):
            return
        first, last = offset // self.row_bytes, -(-end // self.row_bytes)
        wanted = gguf_rows(self.n_rows, self.n_head, first, last)
        low, high = int(wanted.min()), int(wanted.max()) + 1
        span = np.empty((high - low, self.row_bytes), dtype=np.uint8)
        self.base.read_into(self.offset + low * self.row_bytes, span.data.cast("B"), check)
        ordered = span[wanted - low].reshape(-1)
        skip = offset - first * self.row_bytes
        np.frombuffer(dest, dtype=np.uint8)[:] = ordered[skip : skip + len(dest)]
