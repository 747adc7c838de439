"""Balance like `hierarchical`, but move few experts and keep groups on their node.

Under locality "group" (the default) with groups that divide over nodes, every group
keeps all its replicas on one node: without a previous mapping this is `hierarchical`'s
grouped placement, and with one `grouped_moves.grouped_from` limits the moves node by
node. The rest of this docstring is locality "relaxed" (or DeepSeek's global fallback).

Without a previous mapping this is `hierarchical` whose refinement, among the swaps
that lower a layer's top load, takes first those that keep replicas on their group's
home node (the node DeepSeek's placement gives the group).

With a previous mapping, the from-scratch `hierarchical` placement sets each layer's
target top load, and several candidates are built per layer, each refined until it
meets its target with swaps that put no expert on a GPU that lacked it taken first:

- the previous placement itself;
- `sticky_packing` with the from-scratch replica counts, at a few slacks (how much
  balance a replica may give up to stay on a GPU that held its expert);
- the from-scratch placement with its GPUs renumbered to overlap the previous one
  (this one meets every target).

`choose` then takes, per layer, the candidate that minimises moves + lambda * top load,
with the smallest lambda for which the summed top loads are no higher than from
scratch: overall balancedness is never below `hierarchical`'s on the same load, and the
experts kept in place keep the previous mapping's groups on their nodes.
"""

from __future__ import annotations

import torch

from weightserve.eplb.mapping import ExpertMapping, gpu_loads, held_by_gpu, replica_counts
from weightserve.eplb.policies.base import Policy, register_policy
from weightserve.eplb.policies.greedy import greedy_placement
from weightserve.eplb.policies.grouped import grouped_placement
from weightserve.eplb.policies.grouped_moves import grouped_from
from weightserve.eplb.policies.hierarchical import HierarchicalPolicy, best_of, global_placement
from weightserve.eplb.problem import Problem
from weightserve.eplb.refine import SwapPreference, match_gpus, refine_swaps, sticky_packing

# Slacks for sticky_packing, in mean GPU loads; more slack keeps more, balances less.
SLACKS = (0.1, 0.25)


def home_nodes(problem: Problem, phy2log: torch.Tensor) -> torch.Tensor:
    """[layers, num_logical] int64: the node holding most slots of each expert's group."""
    topo = problem.topology
    layers, groups, nodes = problem.num_layers, topo.num_groups, topo.num_nodes
    group = phy2log // problem.group_size
    node = torch.arange(problem.num_physical) // (problem.slots_per_gpu * topo.gpus_per_node)
    table = torch.zeros(layers, groups * nodes, dtype=torch.int64)
    table.scatter_add_(1, group * nodes + node, torch.ones_like(group))
    home = table.view(layers, groups, nodes).argmax(dim=-1)
    return home.repeat_interleave(problem.group_size, dim=1)


def choose(tops: torch.Tensor, moves: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per layer, the option minimising moves + lambda * top, for the least lambda that fits.

    Args:
        tops: [options, layers] top GPU load of each option.
        moves: [options, layers] experts each option moves.
        target: [layers]; the chosen tops must not sum to more than it does, and some
            option must be at or below it in every layer.

    Returns:
        [layers] int64 chosen option per layer.
    """
    cols = torch.arange(tops.shape[1])
    scale = float(target.mean()) or 1.0
    tops, moves, budget = tops / scale, moves.to(torch.float64), float((target / scale).sum())

    def pick(lam: float) -> torch.Tensor:
        return (moves + lam * tops).argmin(dim=0)

    def fits(choice: torch.Tensor) -> bool:
        return float(tops[choice, cols].sum()) <= budget

    if fits(pick(0.0)):
        return pick(0.0)
    lo, hi = -3.0, 15.0  # log10 lambda
    if not fits(pick(10.0**hi)):
        return tops.argmin(dim=0)
    for _ in range(50):
        mid = (lo + hi) / 2
        if fits(pick(10.0**mid)):
            hi = mid
        else:
            lo = mid
    return pick(10.0**hi)


def _moves(problem: Problem, phy2log: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    now = held_by_gpu(phy2log, problem.num_logical, problem.num_gpus)
    return (now & ~before.repeat(phy2log.shape[0] // before.shape[0], 1, 1)).sum(dim=(1, 2))


@register_policy("locality-aware")
class LocalityAwarePolicy(Policy):
    """Hierarchical balance with the fewest moves; groups kept on their home node."""

    def place(self, problem: Problem, previous: ExpertMapping | None) -> torch.Tensor:
        """phy2log; see the module docstring for how `previous` is used."""
        if problem.keeps_groups:
            scratch = grouped_placement(problem)
            return scratch if previous is None else grouped_from(problem, previous.phy2log, scratch, SLACKS)
        if previous is None:
            start = greedy_placement(problem)
            starts = [start]
            if problem.topology.num_nodes > 1 and problem.hierarchical:
                starts.append(global_placement(problem))
            home = home_nodes(problem, start)
            return best_of(
                problem, starts, SwapPreference(home_node=home, gpus_per_node=problem.topology.gpus_per_node)
            )
        return self._from(problem, previous.phy2log)

    def _from(self, problem: Problem, old: torch.Tensor) -> torch.Tensor:
        weight, gpus, layers = problem.weight, problem.num_gpus, problem.num_layers
        scratch = HierarchicalPolicy().place(problem, None)
        target = gpu_loads(weight, scratch, gpus).max(dim=-1).values
        before = held_by_gpu(old, problem.num_logical, gpus)
        copies = len(SLACKS)
        counts = replica_counts(scratch, problem.num_logical).repeat(copies, 1)
        slack = torch.tensor(SLACKS, dtype=torch.float64).repeat_interleave(layers)
        packed = sticky_packing(weight.repeat(copies, 1), counts, before.repeat(copies, 1, 1), gpus, slack)
        starts = torch.cat([old, packed])
        refined = refine_swaps(
            weight.repeat(copies + 1, 1),
            starts,
            gpus,
            target=target.repeat(copies + 1),
            preference=SwapPreference(held_before=before.repeat(copies + 1, 1, 1)),
        )
        options = torch.cat([refined, match_gpus(scratch, old, problem.num_logical, gpus)])
        tops = gpu_loads(weight.repeat(copies + 2, 1), options, gpus).max(dim=-1).values.view(copies + 2, layers)
        moves = _moves(problem, options, before).view(copies + 2, layers)
        pick = choose(tops, moves, target)
        return options.view(copies + 2, layers, -1)[pick, torch.arange(layers)]
