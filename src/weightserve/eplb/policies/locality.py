"""Balance like `hierarchical`, but keep groups on their node and experts where they are.

Every expert group has a home node: where most of its slots are in the mapping in
force (or in DeepSeek's placement when there is none). Among the swaps that lower a
layer's top load, the refinement takes first those that put no expert on a GPU that
did not hold it, then those that keep replicas on their group's home node, and only
then looks at the load (see `SwapPreference`).

Without a previous mapping this is `hierarchical` with that preference. With one, the
from-scratch `hierarchical` placement sets each layer's target top load, and per layer
the policy keeps the cheapest of:

- the previous placement, refined on the new load until it meets the target;
- that placement with its replica counts re-decided (the from-scratch counts, by
  rewriting only the slots that must change), refined the same way;
- the from-scratch placement with its GPUs renumbered to overlap the previous one.

Layers whose cheap options miss their target switch to the renumbered from-scratch
placement, the best balance gained per extra move first, until the summed top loads are
no higher than from scratch: overall balancedness is never below `hierarchical`'s.
"""

from __future__ import annotations

import torch

from weightserve.eplb.align import match_gpus, recount
from weightserve.eplb.mapping import ExpertMapping, gpu_loads, held_by_gpu, replica_counts
from weightserve.eplb.policies.base import Policy, register_policy
from weightserve.eplb.policies.greedy import greedy_placement
from weightserve.eplb.policies.hierarchical import HierarchicalPolicy, best_of, global_placement
from weightserve.eplb.problem import Problem
from weightserve.eplb.refine import SwapPreference, refine_swaps


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


def _moves(problem: Problem, phy2log: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    now = held_by_gpu(phy2log, problem.num_logical, problem.num_gpus)
    return (now & ~before).sum(dim=(1, 2))


def choose(tops: torch.Tensor, moves: torch.Tensor, target: torch.Tensor, fallback: int) -> torch.Tensor:
    """Per layer, the option with the fewest moves, keeping sum(top) <= sum(target).

    Args:
        tops, moves: [options, layers] top GPU load and moves of each option.
        target: [layers] top load to meet; option `fallback` meets it in every layer.
        fallback: index of the option that meets the target everywhere.

    Returns:
        [layers] int64 chosen option.
    """
    options, layers = tops.shape
    cols = torch.arange(layers)
    meets = tops <= target * (1 + 1e-12)
    cost = torch.where(meets, moves.to(torch.float64), torch.inf)
    choice = cost.argmin(dim=0)
    missed = ~meets[choice, cols]
    # Layers with no option at target take their fewest-move option for now ...
    cheapest = moves.argmin(dim=0)
    choice = torch.where(missed, cheapest, choice)
    excess = float((tops[choice, cols] - target).sum())
    if excess <= 0:
        return choice
    # ... then switch to the fallback, most load regained per extra move first.
    gain = tops[choice, cols] - tops[fallback]
    extra = (moves[fallback] - moves[choice, cols]).clamp(min=1).to(torch.float64)
    order = torch.where(missed & (gain > 0), gain / extra, -torch.inf).argsort(descending=True)
    regained = gain[order].cumsum(dim=0)
    count = int((regained < excess).sum()) + 1
    switch = order[: min(count, layers)]
    switch = switch[missed[switch] & (gain[switch] > 0)]
    choice[switch] = fallback
    return choice


@register_policy("locality-aware")
class LocalityAwarePolicy(Policy):
    """Hierarchical balance with the fewest moves and groups kept on their home node."""

    def place(self, problem: Problem, previous: ExpertMapping | None) -> torch.Tensor:
        """phy2log; see the module docstring for how `previous` is used."""
        if previous is None:
            start = greedy_placement(problem)
            starts = [start]
            if problem.topology.num_nodes > 1 and problem.hierarchical:
                starts.append(global_placement(problem))
            pref = SwapPreference(home_node=home_nodes(problem, start), gpus_per_node=problem.topology.gpus_per_node)
            return best_of(problem, starts, pref)
        weight, gpus = problem.weight, problem.num_gpus
        old = previous.phy2log
        scratch = HierarchicalPolicy().place(problem, None)
        target = gpu_loads(weight, scratch, gpus).max(dim=-1).values
        before = held_by_gpu(old, problem.num_logical, gpus)
        pref = SwapPreference(
            held_before=before, home_node=home_nodes(problem, old), gpus_per_node=problem.topology.gpus_per_node
        )
        kept = refine_swaps(weight, old, gpus, target=target, preference=pref)
        counts = replica_counts(scratch, problem.num_logical)
        recounted = refine_swaps(weight, recount(weight, kept, gpus, counts), gpus, target=target, preference=pref)
        options = [kept, recounted, match_gpus(scratch, old, problem.num_logical, gpus)]
        tops = torch.stack([gpu_loads(weight, p, gpus).max(dim=-1).values for p in options])
        moves = torch.stack([_moves(problem, p, before) for p in options])
        pick = choose(tops, moves, target, fallback=len(options) - 1)
        return torch.stack(options)[pick, torch.arange(problem.num_layers)]
