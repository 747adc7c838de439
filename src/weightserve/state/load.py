"""Expert load windows: the sum of each model's last N load reports.

A report's counts are at most MAX_COUNT each and a window holds at most MAX_WINDOW
reports, so a window's int64 sum cannot overflow (2^48 x 2^14 = 2^62): a count above
the bound is refused, never saturated, so what a window sums is what was reported.
Reports that name their EP rank and a sequence number are counted once: a retry
(a sequence not above the last counted for that rank) is acknowledged and ignored.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import torch

from weightserve.errors import InvalidRequestError

MAX_COUNT = 2**48
MAX_WINDOW = 2**14


class LoadWindow:
    """The element-wise sum of the last `size` load reports of one model."""

    def __init__(self, size: int) -> None:
        self.reports: collections.deque[torch.Tensor] = collections.deque()
        self.size = size
        self.total: torch.Tensor | None = None

    def add(self, counts: torch.Tensor) -> int:
        if self.total is None or self.total.shape != counts.shape:
            self.reports.clear()
            self.total = torch.zeros_like(counts)
        self.reports.append(counts)
        self.total += counts
        if len(self.reports) > self.size:
            self.total -= self.reports.popleft()
        return len(self.reports)


def check_counts(counts: Sequence[int]) -> None:
    """Raise InvalidRequestError unless every count is in [0, MAX_COUNT]."""
    if counts and (min(counts) < 0 or max(counts) > MAX_COUNT):
        bad = min(counts) if min(counts) < 0 else max(counts)
        raise InvalidRequestError(f"expert load count {bad} is outside [0, 2^48]; counts must be non-negative tokens")


class ReportSequences:
    """The last counted sequence number of each EP rank of one model."""

    def __init__(self) -> None:
        self.last: dict[int, int] = {}

    def is_retry(self, ep_rank: int | None, sequence: int | None) -> bool:
        """Whether a report is a retry of one already counted (and remember it if not)."""
        if ep_rank is None or sequence is None:
            return False
        last = self.last.get(ep_rank)
        if last is not None and sequence <= last:
            return True
        self.last[ep_rank] = sequence
        return False
