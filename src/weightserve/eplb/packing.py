"""Which expert groups go to which node: exact search when it is small, local search when not.

With every group's replicas on one node (group locality 1.0), a node serves the sum of
its groups' tokens, so the group-to-node packing alone caps how balanced the GPUs can
be: no GPU can serve less than its node's load divided by the node's GPUs. The packings
here are unlabelled (nodes are interchangeable: each has the same GPUs and slots), and
each node takes between `least` and `most` groups.
"""

from __future__ import annotations

import functools

import torch

# Above this many packings per shape, `best_packing` searches locally instead.
MAX_PACKINGS = 20_000


@functools.lru_cache(maxsize=32)
def all_packings(num_groups: int, num_nodes: int, least: int, most: int) -> torch.Tensor | None:
    """[packings, num_groups] int64 node of each group, every packing once; None if too many.

    A packing is listed in its canonical form: group 0 is on node 0 and each group goes
    to a node already used or to the lowest unused one.
    """
    found: list[list[int]] = []
    node = [0] * num_groups
    size = [0] * num_nodes

    def fits(next_group: int, used: int) -> bool:
        left = num_groups - next_group
        short = sum(max(0, least - size[n]) for n in range(used)) + (num_nodes - used) * least
        return short <= left <= used * most - sum(size[:used]) + (num_nodes - used) * most

    def place(group: int, used: int) -> bool:
        if group == num_groups:
            if used == num_nodes:
                found.append(list(node))
            return len(found) <= MAX_PACKINGS
        for n in range(min(used + 1, num_nodes)):
            if size[n] == most:
                continue
            node[group], size[n] = n, size[n] + 1
            ok = not fits(group + 1, max(used, n + 1)) or place(group + 1, max(used, n + 1))
            size[n] -= 1
            if not ok:
                return False
        return True

    if not place(0, 0) or not found:
        return None
    return torch.tensor(found, dtype=torch.int64)


def node_loads(group_load: torch.Tensor, group_node: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """[..., num_nodes] summed group loads per node; group_node broadcasts against group_load."""
    shape = torch.broadcast_shapes(group_load.shape, group_node.shape)
    out = torch.zeros(*shape[:-1], num_nodes, dtype=torch.float64)
    return out.scatter_add_(-1, group_node.expand(shape), group_load.to(torch.float64).expand(shape))


def best_packing(group_load: torch.Tensor, num_nodes: int, start: torch.Tensor) -> torch.Tensor:
    """[layers, num_groups] the equal-count packing with the lowest top node load, per layer.

    Exact when the equal-count packings are few (<= MAX_PACKINGS); otherwise pairwise
    group swaps between the top node and the others, from `start`, while they lower it.
    Ties keep `start` when it is among the best.
    """
    groups = group_load.shape[1]
    per_node = groups // num_nodes
    listed = all_packings(groups, num_nodes, per_node, per_node)
    if listed is None:
        return improve_packing(group_load, start, num_nodes)
    tops = node_loads(group_load.unsqueeze(1), listed, num_nodes).max(dim=-1).values  # [layers, packings]
    best = listed[tops.argmin(dim=1)]
    start_top = node_loads(group_load, start, num_nodes).max(dim=-1).values
    keep = start_top <= tops.min(dim=1).values
    return torch.where(keep.unsqueeze(1), start, best)


def improve_packing(group_load: torch.Tensor, group_node: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Swap two groups of different nodes, one on the top node, while that lowers the pair's larger load."""
    load = group_load.to(torch.float64)
    out = group_node.clone()
    layers, groups = out.shape
    rows = torch.arange(layers)
    for _ in range(groups * groups):
        nodes = node_loads(load, out, num_nodes)
        top = nodes.argmax(dim=1, keepdim=True)
        on_top = out == top  # [layers, groups]
        # Swap a (on the top node) with b (elsewhere): the top node changes by w_b - w_a.
        gain = load.unsqueeze(2) - load.unsqueeze(1)  # [layers, a, b] = w_a - w_b
        other = nodes.gather(1, out)  # load of b's node
        top_load = nodes.gather(1, top)
        worst = torch.maximum(top_load.unsqueeze(2) - gain, other.unsqueeze(1) + gain)
        ok = on_top.unsqueeze(2) & ~on_top.unsqueeze(1) & (worst < top_load.unsqueeze(2) * (1 - 1e-12))
        key, flat = worst.masked_fill(~ok, torch.inf).view(layers, -1).min(dim=1)
        go = key < torch.inf
        if not bool(go.any()):
            break
        a, b = flat // groups, flat % groups
        node_a, node_b = out[rows, a], out[rows, b]
        out[rows[go], a[go]] = node_b[go]
        out[rows[go], b[go]] = node_a[go]
    return out


def packing_bound(group_load: torch.Tensor, num_nodes: int, most: int) -> torch.Tensor:
    """[layers] the lowest top node load any packing reaches (each node 1..`most` groups).

    Exact when the packings are few; otherwise the relaxation max(mean node load,
    heaviest group), which no packing beats either.
    """
    load = group_load.to(torch.float64)
    listed = all_packings(load.shape[1], num_nodes, 1, most)
    if listed is None:
        return torch.maximum(load.sum(dim=1) / num_nodes, load.max(dim=1).values)
    return node_loads(load.unsqueeze(1), listed, num_nodes).max(dim=-1).values.min(dim=1).values
