"""The plain DeepSeek EPLB greedy algorithm, the baseline every other policy is held to.

Follows the published scheme (github.com/deepseek-ai/EPLB) step for step, including
its float32 arithmetic and its tie-breaking (the lowest index wins), so that it
reproduces the README example exactly:

1. pack expert groups onto nodes, heaviest group first, each to the lightest node
   that still has room (every node gets the same number of groups);
2. within each node, give each redundant slot to the expert whose per-replica load
   is currently highest;
3. within each node, pack the replicas onto GPUs the same way as step 1.

When groups do not divide over nodes, the whole cluster is treated as one node with
one group ("global" balancing). The loops run over items, never over layers: each step
is one batched tensor operation across all layers (and nodes).
"""

from __future__ import annotations

import torch

from weightserve.eplb.mapping import ExpertMapping
from weightserve.eplb.policies.base import Policy, register_policy
from weightserve.eplb.problem import Problem


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """Row-wise inverse: out[r, perm[r, i]] = i."""
    inv = torch.empty_like(perm)
    return inv.scatter_(1, perm, torch.arange(perm.shape[1]).expand_as(perm).contiguous())


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack each row's items into `num_packs` packs of equal item count, heaviest first.

    Each item goes to the lightest pack that still has room (lowest index on ties).

    Args:
        weight: [rows, items], items a multiple of num_packs.
        num_packs: packs per row.

    Returns:
        (pack, rank): [rows, items] int64, each item's pack and its position in it
        (the order in which the pack received its items).
    """
    rows, items = weight.shape
    per_pack = items // num_packs
    if per_pack == 1:
        return torch.arange(items).expand(rows, -1).clone(), torch.zeros(rows, items, dtype=torch.int64)
    weight = weight.float()
    order = weight.sort(dim=-1, descending=True, stable=True).indices
    heavy_first = weight.gather(1, order)
    # A full pack's load becomes +inf, so argmin only sees packs with room.
    loads = torch.zeros(rows, num_packs, dtype=torch.float32)
    filled = torch.zeros(rows, num_packs, dtype=torch.int64)
    chosen = torch.empty(rows, items, dtype=torch.int64)
    one = torch.ones(rows, 1, dtype=torch.int64)
    for step in range(items):
        target = loads.argmin(dim=-1, keepdim=True)
        chosen[:, step : step + 1] = target
        loads.scatter_add_(1, target, heavy_first[:, step : step + 1])
        filled.scatter_add_(1, target, one)
        loads.masked_fill_(filled == per_pack, torch.inf)
    pack = torch.empty_like(chosen).scatter_(1, order, chosen)
    # Rank in pack = how many earlier (heavier) items went to the same pack.
    by_pack = chosen.argsort(dim=1, stable=True)
    rank_sorted = torch.arange(items).expand(rows, -1) - torch.searchsorted(
        chosen.gather(1, by_pack), chosen.gather(1, by_pack)
    )
    rank_in_order = torch.empty_like(chosen).scatter_(1, by_pack, rank_sorted)
    rank = torch.empty_like(chosen).scatter_(1, order, rank_in_order)
    return pack, rank


def replicate_experts(
    weight: torch.Tensor, num_physical: int, most: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Give each redundant slot to the expert with the highest load per replica.

    Args:
        weight: [rows, num_logical].
        num_physical: slots per row, >= num_logical.
        most: replicas an expert may get while another has fewer (None: no cap, as
            DeepSeek's); with `most` GPUs, more replicas than GPUs put two on one GPU.

    Returns:
        (phy2log, logcnt): slot i < num_logical holds expert i, later slots hold the
        replicas in the order they were handed out; logcnt counts replicas.
    """
    rows, num_logical = weight.shape
    phy2log = torch.arange(num_physical).repeat(rows, 1)
    logcnt = torch.ones(rows, num_logical, dtype=torch.int64)
    row = torch.arange(rows)
    for slot in range(num_logical, num_physical):
        share = weight / logcnt
        if most is not None:
            share = share.masked_fill(logcnt >= most, -1.0)
        hottest = share.argmax(dim=-1)
        phy2log[:, slot] = hottest
        logcnt[row, hottest] += 1
    return phy2log, logcnt


def hierarchical_greedy(
    weight: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> torch.Tensor:
    """DeepSeek's node-then-GPU scheme; returns phy2log [layers, num_physical]."""
    layers, num_logical = weight.shape
    weight = weight.float()
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = num_logical // num_nodes
    slots_per_gpu = num_physical // num_gpus

    # Step 1: groups to nodes. node-major logical id ("mlog") = position after packing.
    group_node, group_rank = balanced_packing(weight.view(layers, num_groups, group_size).sum(-1), num_nodes)
    first = (group_node * groups_per_node + group_rank) * group_size
    log2mlog = (first.unsqueeze(-1) + torch.arange(group_size)).flatten(-2)
    mlog2log = inverse_permutation(log2mlog)

    # Step 2: replicate within each node; rows are (layer, node).
    node_weight = weight.gather(-1, mlog2log).view(-1, experts_per_node)
    phy2mlog, mlogcnt = replicate_experts(node_weight, num_physical // num_nodes)

    # Step 3: replicas to the node's GPUs.
    replica_weight = (node_weight / mlogcnt).gather(-1, phy2mlog)
    gpu, rank = balanced_packing(replica_weight, num_gpus // num_nodes)
    packed2phy = inverse_permutation(gpu * slots_per_gpu + rank)
    packed2mlog = phy2mlog.gather(-1, packed2phy).view(layers, num_nodes, -1)
    packed2mlog = packed2mlog + (torch.arange(num_nodes) * experts_per_node).view(1, -1, 1)
    return mlog2log.gather(-1, packed2mlog.flatten(-2))


def deepseek_greedy(
    weight: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> torch.Tensor:
    """The published entry point: hierarchical when groups divide over nodes, else global."""
    if num_groups % num_nodes == 0:
        return hierarchical_greedy(weight, num_physical, num_groups, num_nodes, num_gpus)
    return hierarchical_greedy(weight, num_physical, 1, 1, num_gpus)


def greedy_placement(problem: Problem) -> torch.Tensor:
    """deepseek_greedy on a Problem."""
    topo = problem.topology
    return deepseek_greedy(problem.weight, problem.num_physical, topo.num_groups, topo.num_nodes, topo.num_gpus)


@register_policy("greedy")
class GreedyPolicy(Policy):
    """The plain DeepSeek algorithm, unrefined; ignores the previous mapping."""

    def place(self, problem: Problem, previous: ExpertMapping | None) -> torch.Tensor:
        """phy2log from `deepseek_greedy`."""
        return greedy_placement(problem)
