"""The working state the refinement passes share, and the cost classes they honour."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weightserve.eplb.mapping import replica_counts


@dataclass(frozen=True, eq=False)
class SwapPreference:
    """Cost classes for choosing among improving swaps (lower class wins first).

    Attributes:
        held_before: [layers, gpus, logical] bool, what each GPU held in the mapping in
            force; a swap costs 2 per replica it puts on a GPU that did not hold it.
        home_node: [layers, logical] int64, the node an expert's group lives on; a
            swap costs 1 per replica it puts off that node.
        gpus_per_node: GPUs per node, to find a GPU's node.
    """

    held_before: torch.Tensor | None = None
    home_node: torch.Tensor | None = None
    gpus_per_node: int = 1


class RefineState:
    """Working state of the layers being refined; finished layers are dropped in batches.

    `held` counts replicas per (row, GPU, expert) for every input row, indexed by the
    row's original number, so dropping rows never copies it.
    """

    def __init__(self, weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int, target: torch.Tensor) -> None:
        layers, num_physical = phy2log.shape
        num_logical = weight.shape[1]
        self.weight = weight
        self.count = replica_counts(phy2log, num_logical).to(torch.float64)
        self.rows = torch.arange(layers)
        self.p2l = phy2log.clone()
        self.share = (weight / self.count).gather(1, phy2log)
        self.load = self.share.view(layers, num_gpus, -1).sum(-1)
        self.target = target
        self.live = torch.ones(layers, dtype=torch.bool)
        self.waiting = torch.zeros(layers, dtype=torch.bool)
        gpu = torch.arange(num_physical) // (num_physical // num_gpus)
        cell = (self.rows[:, None] * num_gpus + gpu) * num_logical + phy2log
        self.held = torch.zeros(layers * num_gpus * num_logical, dtype=torch.int32)
        self.held.index_add_(0, cell.flatten(), torch.ones(cell.numel(), dtype=torch.int32))
        self.num_gpus, self.num_logical = num_gpus, num_logical

    def cells(self, rows: torch.Tensor, gpus: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Flat index into `held` (arguments broadcast)."""
        return (rows * self.num_gpus + gpus) * self.num_logical + experts

    def count_at(self, cells: torch.Tensor) -> torch.Tensor:
        """`held` at flat indices `cells` (any shape)."""
        return self.held.index_select(0, cells.flatten()).view(cells.shape)

    def flush(self, out: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Write every row to `out`, then keep only the rows in `keep` (all when None)."""
        out[self.rows] = self.p2l
        if keep is not None:
            for name in ("rows", "weight", "count", "p2l", "share", "load", "target", "live", "waiting"):
                setattr(self, name, getattr(self, name)[keep])
