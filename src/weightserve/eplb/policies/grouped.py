"""Placement that keeps every expert group, with all its replicas, on one node.

DeepSeek's hierarchical scheme exists for node-limited routing: a token is routed to a
few expert groups, so when each group lives on one node the token's dispatch reaches
at most that many nodes. Under that constraint a layer's balance can still be improved
in three ways, and `grouped_placement` uses all three:

- which groups go to which node: DeepSeek's greedy packing, and the packing with the
  lowest top node load (`packing.best_packing`), which bounds what any placement with
  this constraint reaches;
- how a node's redundant slots are shared between its experts: DeepSeek's replication,
  the same capped at one replica per GPU, and counts sized for a target top load
  (`sized_counts`), each packed onto the node's GPUs;
- how a node's replicas are packed onto its GPUs: `refine_swaps` runs on each
  (layer, node) as a problem of its own (slot rewrites included), so no replica ever
  leaves its node.

DeepSeek's own placement is the first start, and per layer the refined start with the
lowest top GPU load is kept (the earliest on ties); as the refinement never raises a
top load, no layer ends less balanced than DeepSeek's greedy placement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weightserve.eplb.mapping import gpu_loads
from weightserve.eplb.packing import best_packing
from weightserve.eplb.policies.greedy import balanced_packing, inverse_permutation, replicate_experts
from weightserve.eplb.problem import Problem
from weightserve.eplb.refine import refine_swaps, sticky_packing

# Top loads (in mean GPU loads of the node) that `sized_counts` sizes replica counts for.
SIZING_FACTORS = (1.0, 1.1)


@dataclass(frozen=True, eq=False)
class NodeSplit:
    """A layer's experts renumbered node-major, so each node's experts are one block.

    Attributes:
        mlog2log: [layers, num_logical] the logical expert at each node-major position;
            node n holds positions [n*E/N, (n+1)*E/N).
        weight: [layers * nodes, E/N] float64 token counts, one row per (layer, node).
        num_nodes: nodes.
    """

    mlog2log: torch.Tensor
    weight: torch.Tensor
    num_nodes: int

    @property
    def per_node(self) -> int:
        """Experts per node."""
        return int(self.weight.shape[1])

    def join(self, local: torch.Tensor) -> torch.Tensor:
        """phy2log [layers, P] from node-local slot tables [layers * nodes, P / N] (node-local ids)."""
        layers = self.mlog2log.shape[0]
        offset = (torch.arange(self.num_nodes) * self.per_node).view(1, -1, 1)
        mlog = (local.view(layers, self.num_nodes, -1) + offset).flatten(1)
        return self.mlog2log.gather(1, mlog)

    def local(self, phy2log: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`phy2log` per (layer, node) in node-local ids, and whether each node holds only its own experts.

        Returns:
            ([layers * nodes, P / N] int64, [layers * nodes] bool).
        """
        layers = phy2log.shape[0]
        log2mlog = inverse_permutation(self.mlog2log)
        mlog = log2mlog.gather(1, phy2log).view(layers, self.num_nodes, -1)
        node = torch.arange(self.num_nodes).view(1, -1, 1)
        inside = (mlog // self.per_node == node).all(dim=-1).flatten()
        return (mlog % self.per_node).view(layers * self.num_nodes, -1), inside


def split_by_node(problem: Problem, group_node: torch.Tensor, group_rank: torch.Tensor | None = None) -> NodeSplit:
    """Renumber experts node-major for a packing of groups to nodes (equal groups per node).

    Args:
        group_node: [layers, num_groups] each group's node.
        group_rank: [layers, num_groups] each group's position on its node; None orders
            a node's groups by group id.
    """
    topo = problem.topology
    size, per_node_groups = problem.group_size, topo.num_groups // topo.num_nodes
    if group_rank is None:
        by_node = group_node.argsort(dim=1, stable=True)
        ranked = torch.arange(topo.num_groups).expand_as(group_node) % per_node_groups
        group_rank = torch.empty_like(group_node).scatter_(1, by_node, ranked)
    first = (group_node * per_node_groups + group_rank) * size
    log2mlog = (first.unsqueeze(-1) + torch.arange(size)).flatten(-2)
    mlog2log = inverse_permutation(log2mlog)
    weight = problem.weight.gather(1, mlog2log).view(-1, problem.num_logical // topo.num_nodes)
    return NodeSplit(mlog2log, weight, topo.num_nodes)


def node_greedy(split: NodeSplit, problem: Problem, capped: bool = False, factor: float | None = None) -> torch.Tensor:
    """DeepSeek's steps 2 and 3 on each (layer, node): replicate in the node, pack onto its GPUs.

    Args:
        capped: give no expert more replicas than the node has GPUs while another
            expert could take the slot (DeepSeek's own replication has no cap, and a
            hot expert's extra replica then shares a GPU with another of its replicas).
        factor: with `capped`, size replica counts for this top load instead
            (`sized_counts`).

    Returns:
        [layers * nodes, P / N] node-local slot tables.
    """
    gpus = problem.topology.gpus_per_node
    weight = split.weight.float()
    slots = problem.num_physical // split.num_nodes
    phy2mlog, counts = replicate_experts(weight, slots, gpus if capped else None)
    if capped:  # and no GPU gets a second replica of an expert while another GPU with room lacks it
        rows, experts = split.weight.shape
        if factor is not None:
            counts = sized_counts(split.weight, slots, gpus, factor)
        nowhere = torch.zeros(rows, gpus, experts, dtype=torch.bool)
        return sticky_packing(split.weight, counts, nowhere, gpus, torch.zeros(rows, dtype=torch.float64))
    gpu, rank = balanced_packing((weight / counts).gather(-1, phy2mlog), gpus)
    return phy2mlog.gather(-1, inverse_permutation(gpu * (slots // gpus) + rank))


def sized_counts(weight: torch.Tensor, slots: int, gpus: int, factor: float) -> torch.Tensor:
    """[rows, experts] replica counts sized for a top GPU load of `factor` mean GPU loads.

    Each expert gets the fewest replicas (at most `gpus`) whose share fits under that
    load; each slot left over goes to the expert with the fewest replicas, the coldest
    on ties, where a replica costs nothing (the refinement's slot rewrites may move it).
    A row whose experts need more than `slots` falls back to DeepSeek's capped
    replication.
    """
    rows, experts = weight.shape
    target = (factor * weight.sum(dim=1, keepdim=True) / gpus).clamp(min=1e-300)
    counts = torch.ceil(weight / target).clamp(1, gpus).to(torch.int64)
    spare = slots - counts.sum(dim=1)
    rank = torch.empty_like(counts).scatter_(
        1, weight.argsort(dim=1, stable=True), torch.arange(experts).expand(rows, -1).contiguous()
    )
    row = torch.arange(rows)
    for step in range(int(spare.max()) if rows else 0):
        taker = (counts * experts + rank).argmin(dim=1)
        counts[row, taker] += (spare > step).to(torch.int64)
    fallback = replicate_experts(weight.float(), slots, gpus)[1]
    return torch.where((spare >= 0).unsqueeze(1), counts, fallback)


def deepseek_packing(problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """(group_node, group_rank) as DeepSeek's greedy packs groups onto nodes."""
    groups = problem.weight.view(problem.num_layers, problem.topology.num_groups, -1).sum(-1)
    return balanced_packing(groups, problem.topology.num_nodes)


def grouped_placement(problem: Problem, refine: bool = True) -> torch.Tensor:
    """phy2log with group locality 1.0; needs num_groups to be a multiple of num_nodes.

    Args:
        refine: False gives DeepSeek's greedy placement (one start, unrefined).
    """
    topo = problem.topology
    node, rank = deepseek_packing(problem)
    deepseek = split_by_node(problem, node, rank)
    if not refine:
        return deepseek.join(node_greedy(deepseek, problem))
    groups = problem.weight.view(problem.num_layers, topo.num_groups, -1).sum(-1)
    best = split_by_node(problem, best_packing(groups, topo.num_nodes, node))
    owner = [deepseek, best] + [best] * len(SIZING_FACTORS)
    starts = [node_greedy(deepseek, problem), node_greedy(best, problem, capped=True)]
    starts += [node_greedy(best, problem, capped=True, factor=f) for f in SIZING_FACTORS]
    if topo.gpus_per_node > 1:  # every start refined in one batch
        weight = torch.cat([split.weight for split in owner])
        starts = list(refine_swaps(weight, torch.cat(starts), topo.gpus_per_node).chunk(len(starts)))
    return best_per_layer(problem, [split.join(local) for split, local in zip(owner, starts, strict=True)])


def best_per_layer(problem: Problem, placements: list[torch.Tensor]) -> torch.Tensor:
    """Per layer, the placement with the lowest top GPU load (the earliest on ties)."""
    if len(placements) == 1:
        return placements[0]
    layers = problem.num_layers
    stacked = torch.cat(placements)
    weight = problem.weight.repeat(len(placements), 1)
    top = gpu_loads(weight, stacked, problem.num_gpus).max(dim=-1).values.view(len(placements), layers)
    return stacked.view(len(placements), layers, -1)[top.argmin(dim=0), torch.arange(layers)]
