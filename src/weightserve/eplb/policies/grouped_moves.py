"""`locality-aware` under locality "group": few moves, every group kept on one node.

The from-scratch grouped placement sets each layer's target top load. Its nodes are
renumbered to overlap the previous mapping most (nodes are interchangeable, so loads do
not change), which fixes each group's node. Then every (layer, node) is its own small
problem, solved as `locality-aware` solves a layer: candidates refined until they meet
the target with swaps that put no expert on a GPU that lacked it taken first,

- the previous placement of the node, where it holds the node's experts and only them;
- `sticky_packing` with the from-scratch replica counts, at a few slacks;
- the from-scratch node with its GPUs renumbered to overlap the previous ones (this
  one always meets the target),

and each (layer, node) keeps the candidate with the fewest moves among those at or
below the layer's target, so no layer ends less balanced than from scratch.
"""

from __future__ import annotations

import torch

from weightserve.eplb.mapping import gpu_loads, held_by_gpu, replica_counts
from weightserve.eplb.policies.grouped import split_by_node
from weightserve.eplb.problem import Problem
from weightserve.eplb.refine import SwapPreference, match_held, refine_swaps, sticky_packing

_REL_EPS = 1e-12


def group_nodes(problem: Problem, phy2log: torch.Tensor) -> torch.Tensor:
    """[layers, num_groups, num_nodes] int64: slots of each group on each node."""
    topo = problem.topology
    layers, groups, nodes = problem.num_layers, topo.num_groups, topo.num_nodes
    group = phy2log // problem.group_size
    node = torch.arange(problem.num_physical) // (problem.num_physical // nodes)
    table = torch.zeros(layers, groups * nodes, dtype=torch.int64)
    return table.scatter_add_(1, group * nodes + node, torch.ones_like(group)).view(layers, groups, nodes)


def match_nodes(problem: Problem, scratch: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """`scratch` with its nodes (blocks of slots) renumbered to hold the groups `old` had there."""
    layers, nodes = problem.num_layers, problem.topology.num_nodes
    home = group_nodes(problem, scratch).argmax(dim=-1)  # [layers, groups]
    mine = torch.nn.functional.one_hot(home, nodes).to(torch.float64)  # [layers, groups, new node]
    overlap = torch.bmm(mine.transpose(1, 2), group_nodes(problem, old).to(torch.float64))  # [layers, new, old]
    dest = torch.empty(layers, nodes, dtype=torch.int64)
    rows = torch.arange(layers)
    for _ in range(nodes):
        flat = overlap.view(layers, -1).argmax(dim=-1)
        new, was = flat // nodes, flat % nodes
        dest[rows, new] = was
        overlap[rows, new, :] = -1.0
        overlap[rows, :, was] = -1.0
    blocks = scratch.view(layers, nodes, -1)
    out = torch.empty_like(blocks).scatter_(1, dest[:, :, None].expand_as(blocks), blocks)
    return out.view(layers, -1)


def grouped_from(problem: Problem, old: torch.Tensor, scratch: torch.Tensor, slacks: tuple[float, ...]) -> torch.Tensor:
    """phy2log with group locality 1.0 that moves few experts from `old` (see the module docstring)."""
    topo = problem.topology
    layers, nodes, gpus = problem.num_layers, topo.num_nodes, topo.gpus_per_node
    target = gpu_loads(problem.weight, scratch, problem.num_gpus).max(dim=-1).values.repeat_interleave(nodes)
    scratch = match_nodes(problem, scratch, old)
    split = split_by_node(problem, group_nodes(problem, scratch).argmax(dim=-1))
    per_node = split.per_node
    fresh, _ = split.local(scratch)
    before = held_by_gpu(old, problem.num_logical, problem.num_gpus).view(layers, nodes, gpus, -1)
    mine = split.mlog2log.view(layers, nodes, 1, per_node).expand(-1, -1, gpus, -1)
    before = before.gather(3, mine).reshape(layers * nodes, gpus, per_node)
    matched = match_held(fresh, before, per_node, gpus)
    kept, inside = split.local(old)
    # a node of the old mapping is kept only if it holds its own experts, and every one of
    # them: a spread previous mapping can leave one of a node's experts on another node
    complete = held_by_gpu(kept, per_node, gpus).any(dim=1).all(dim=1)
    kept = torch.where((inside & complete).unsqueeze(1), kept, matched)
    rows, copies = layers * nodes, len(slacks)
    counts = replica_counts(fresh, per_node).repeat(copies, 1)
    slack = torch.tensor(slacks, dtype=torch.float64).repeat_interleave(rows)
    packed = sticky_packing(split.weight.repeat(copies, 1), counts, before.repeat(copies, 1, 1), gpus, slack)
    options = torch.cat([kept, packed])
    if gpus > 1:
        options = refine_swaps(
            split.weight.repeat(copies + 1, 1),
            options,
            gpus,
            target=target.repeat(copies + 1),
            preference=SwapPreference(held_before=before.repeat(copies + 1, 1, 1)),
        )
    options = torch.cat([options, matched])
    count = copies + 2
    tops = gpu_loads(split.weight.repeat(count, 1), options, gpus).max(dim=-1).values.view(count, rows)
    held = held_by_gpu(options, per_node, gpus)
    moves = (held & ~before.repeat(count, 1, 1)).sum(dim=(1, 2)).view(count, rows).to(torch.float64)
    # The matched from-scratch node always fits (its top is at most its layer's), so every row has a choice.
    fits = tops <= target * (1 + _REL_EPS)
    fits[-1] = True
    pick = moves.masked_fill(~fits, torch.inf).argmin(dim=0)
    return split.join(options.view(count, rows, -1)[pick, torch.arange(rows)])
