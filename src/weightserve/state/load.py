"""Expert load windows: the sum of each model's last N load reports."""

from __future__ import annotations

import collections

import torch


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
