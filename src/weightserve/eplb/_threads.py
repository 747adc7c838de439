"""Run the placement work on the calling thread only.

The policies issue many small batched tensor operations. ATen hands each one above a
small size to its OpenMP pool; on a two-core host that other processes also use, every
such hand-off waits for a descheduled worker and costs milliseconds; we measured a
DeepSeek-V3-sized rebalance 5-30x slower with two threads than with one. `one_thread()`
sets the intra-op thread count to 1 for the block and restores it after. With the
OpenMP backend the count is per thread: threads already running keep theirs, but a
thread that first uses torch during the block starts with one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Within the block, torch ops of this thread run without intra-op parallelism."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
