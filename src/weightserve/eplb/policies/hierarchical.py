"""The default policy: DeepSeek's hierarchical scheme, then the swap refinement.

Under locality "group" (the default) with groups that divide over nodes, every group
stays on one node with all its replicas (`grouped.grouped_placement`). Otherwise
(locality "relaxed", or DeepSeek's global fallback) each layer is placed twice and the
better result kept:

- DeepSeek's own placement (groups packed onto nodes, hottest experts replicated within
  each node, replicas packed onto GPUs; global when groups do not divide over nodes),
  then `refine_swaps`;
- the replicas re-decided over the whole cluster (DeepSeek's global replication and
  packing, one node, one group), then `refine_swaps`.

The refinement never raises a layer's top GPU load, so every layer ends at least as
balanced as plain DeepSeek. Node packing of whole groups can leave a node with far more
than its share of tokens (one hot expert group), and then only the second start, which
spreads a group's replicas over nodes, balances the GPUs further: that is the balance
"relaxed" buys with inter-node traffic.
"""

from __future__ import annotations

import torch

from weightserve.eplb.mapping import ExpertMapping, gpu_loads
from weightserve.eplb.policies.base import Policy, register_policy
from weightserve.eplb.policies.greedy import deepseek_greedy, greedy_placement
from weightserve.eplb.policies.grouped import grouped_placement
from weightserve.eplb.problem import Problem
from weightserve.eplb.refine import SwapPreference, refine_swaps


def best_of(problem: Problem, starts: list[torch.Tensor], preference: SwapPreference | None = None) -> torch.Tensor:
    """Refine every start in one batch and keep, per layer, the lowest top GPU load.

    Ties go to the earlier start.
    """
    layers = problem.num_layers
    weight = problem.weight.repeat(len(starts), 1)
    if preference is not None:
        preference = SwapPreference(
            held_before=None if preference.held_before is None else preference.held_before.repeat(len(starts), 1, 1),
            home_node=None if preference.home_node is None else preference.home_node.repeat(len(starts), 1),
            gpus_per_node=preference.gpus_per_node,
        )
    refined = refine_swaps(weight, torch.cat(starts), problem.num_gpus, preference=preference)
    top = gpu_loads(weight, refined, problem.num_gpus).max(dim=-1).values.view(len(starts), layers)
    choice = top.argmin(dim=0)  # first minimum on ties
    return refined.view(len(starts), layers, -1)[choice, torch.arange(layers)]


def global_placement(problem: Problem) -> torch.Tensor:
    """DeepSeek's global scheme: replicas decided and packed over the whole cluster."""
    return deepseek_greedy(problem.weight, problem.num_physical, 1, 1, problem.num_gpus)


@register_policy("hierarchical")
class HierarchicalPolicy(Policy):
    """DeepSeek's scheme plus refinement; ignores the previous mapping.

    Args:
        refine: False gives the greedy stage alone (plain DeepSeek).
    """

    def __init__(self, refine: bool = True) -> None:
        self.refine = refine

    def place(self, problem: Problem, previous: ExpertMapping | None) -> torch.Tensor:
        """phy2log: the better of the refined starts, per layer."""
        if problem.keeps_groups:
            return grouped_placement(problem, self.refine)
        start = greedy_placement(problem)
        if not self.refine:
            return start
        starts = [start]
        if problem.topology.num_nodes > 1 and problem.hierarchical:
            starts.append(global_placement(problem))
        return best_of(problem, starts)
