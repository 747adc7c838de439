"""How good a mapping is: balance of GPU loads, and what moving to it costs.

A GPU's load is the tokens of the experts it holds, where a replicated expert's tokens
split evenly over its replicas. Balancedness is mean GPU load over max GPU load: 1.0 is
perfect. The overall figure sums over layers before dividing (sum of means over sum of
maxima), as vLLM logs it, so heavy layers count more than idle ones.

A move is a (layer, GPU, expert) the GPU holds now but did not hold before: the expert's
weights must travel to it once, however many of its slots hold that expert.

What balance costs in inter-node traffic is estimated with a stated model of routing
(`dispatch_nodes`): each token picks `topk_group` expert groups, group g with
probability min(1, topk_group * load_g / layer load), independently, and its dispatch
reaches every node that holds a replica of an expert of a picked group. With group
locality 1.0 that is at most `topk_group` nodes; spreading groups over nodes raises it.
`locality_bound` is the best balancedness any placement with group locality 1.0 can
reach: a node then serves the sum of its groups' loads, so the best packing of groups
onto nodes caps mean over max GPU load.
"""

from __future__ import annotations

import torch

from weightserve.eplb.mapping import ExpertMapping, gpu_loads, held_by_gpu
from weightserve.eplb.packing import packing_bound
from weightserve.errors import InvalidRequestError


def _loads(weight: object, mapping: ExpertMapping) -> torch.Tensor:
    table = torch.as_tensor(weight).to(torch.float64)
    if tuple(table.shape) != (mapping.num_layers, mapping.num_logical):
        raise InvalidRequestError(
            f"weight shape {list(table.shape)} does not match the mapping's "
            f"[{mapping.num_layers}, {mapping.num_logical}]"
        )
    return gpu_loads(table, mapping.phy2log, mapping.topology.num_gpus)


def layer_loads(weight: object, mapping: ExpertMapping) -> torch.Tensor:
    """[layers, num_gpus] float64 tokens per GPU under `mapping`."""
    return _loads(weight, mapping)


def layer_balancedness(weight: object, mapping: ExpertMapping) -> torch.Tensor:
    """[layers] mean over max GPU load per layer; 1.0 for a layer with no tokens."""
    loads = _loads(weight, mapping)
    top = loads.max(dim=-1).values
    return torch.where(top > 0, loads.mean(dim=-1) / top.clamp(min=1e-300), 1.0)


def balancedness(weight: object, mapping: ExpertMapping) -> float:
    """Sum over layers of mean GPU load / sum over layers of max GPU load (1.0 if no tokens)."""
    loads = _loads(weight, mapping)
    top = float(loads.max(dim=-1).values.sum())
    return float(loads.mean(dim=-1).sum()) / top if top > 0 else 1.0


def layer_max_mean_ratio(weight: object, mapping: ExpertMapping) -> torch.Tensor:
    """[layers] max over mean GPU load per layer (>= 1.0; 1.0 for a layer with no tokens)."""
    return 1.0 / layer_balancedness(weight, mapping)


def max_mean_ratio(weight: object, mapping: ExpertMapping) -> float:
    """Sum of per-layer maxima over sum of per-layer means: 1 / balancedness."""
    return 1.0 / balancedness(weight, mapping)


def layer_experts_moved(previous: ExpertMapping, mapping: ExpertMapping) -> torch.Tensor:
    """[layers] int64: (GPU, expert) pairs `mapping` holds that `previous` did not."""
    mapping.check_comparable(previous)
    gpus, logical = mapping.topology.num_gpus, mapping.num_logical
    now = held_by_gpu(mapping.phy2log, logical, gpus)
    before = held_by_gpu(previous.phy2log, logical, gpus)
    return (now & ~before).sum(dim=(1, 2))


def experts_moved(previous: ExpertMapping, mapping: ExpertMapping) -> int:
    """Expert weights that must travel to some GPU to go from `previous` to `mapping`."""
    return int(layer_experts_moved(previous, mapping).sum())


def bytes_moved(previous: ExpertMapping, mapping: ExpertMapping, bytes_per_expert: int) -> int:
    """experts_moved times the bytes of one expert's weights (one layer's copy)."""
    if bytes_per_expert < 0:
        raise InvalidRequestError(f"bytes_per_expert must be >= 0, got {bytes_per_expert}")
    return experts_moved(previous, mapping) * bytes_per_expert


def group_locality(mapping: ExpertMapping) -> float:
    """Share of physical slots that sit on the node holding most of their group's slots.

    1.0 when every expert group's replicas share one node (what group-limited routing
    wants); lower when groups spread over nodes.
    """
    topo = mapping.topology
    layers, groups, nodes = mapping.num_layers, topo.num_groups, topo.num_nodes
    if layers == 0 or mapping.num_logical % groups:
        return 1.0
    group = mapping.phy2log // (mapping.num_logical // groups)
    node = torch.arange(mapping.num_physical) // (mapping.slots_per_gpu * topo.gpus_per_node)
    table = torch.zeros(layers, groups * nodes, dtype=torch.int64)
    table.scatter_add_(1, group * nodes + node, torch.ones_like(group))
    return float(table.view(layers, groups, nodes).max(dim=-1).values.sum()) / (layers * mapping.num_physical)


def _node_slot_groups(mapping: ExpertMapping) -> torch.Tensor:
    """[layers, groups, nodes] bool: whether a node holds a replica of some expert of the group."""
    topo = mapping.topology
    layers, groups, nodes = mapping.num_layers, topo.num_groups, topo.num_nodes
    group = mapping.phy2log // (mapping.num_logical // groups)
    node = torch.arange(mapping.num_physical) // (mapping.slots_per_gpu * topo.gpus_per_node)
    table = torch.zeros(layers, groups * nodes, dtype=torch.int64)
    table.scatter_add_(1, group * nodes + node, torch.ones_like(group))
    return table.view(layers, groups, nodes) > 0


def layer_dispatch_nodes(weight: object, mapping: ExpertMapping, topk_group: int) -> torch.Tensor:
    """[layers] expected nodes one token's dispatch reaches, under the module's routing model.

    Raises:
        InvalidRequestError: topk_group is not in [1, num_groups], or the weight does
            not match the mapping.
    """
    groups = mapping.topology.num_groups
    if isinstance(topk_group, bool) or not isinstance(topk_group, int) or not 1 <= topk_group <= groups:
        raise InvalidRequestError(f"topk_group must be an integer in [1, {groups}], got {topk_group!r}")
    _loads(weight, mapping)  # shape check
    table = torch.as_tensor(weight).to(torch.float64)
    load = table.view(mapping.num_layers, groups, -1).sum(-1)
    total = load.sum(dim=1, keepdim=True)
    share = torch.where(total > 0, load / total.clamp(min=1e-300), 1.0 / groups)
    pick = (topk_group * share).clamp(max=1.0)  # [layers, groups]
    present = _node_slot_groups(mapping).to(torch.float64)  # [layers, groups, nodes]
    missed = torch.exp((present * torch.log1p(-pick.clamp(max=1 - 1e-15)).unsqueeze(-1)).sum(dim=1))
    missed = torch.where((present * (pick.unsqueeze(-1) >= 1)).sum(dim=1) > 0, 0.0, missed)
    return (1.0 - missed).sum(dim=-1)


def dispatch_nodes(weight: object, mapping: ExpertMapping, topk_group: int) -> float:
    """Mean over layers of `layer_dispatch_nodes`: nodes a token's dispatch reaches per MoE layer."""
    return float(layer_dispatch_nodes(weight, mapping, topk_group).mean()) if mapping.num_layers else 0.0


def layer_locality_bound(weight: object, mapping: ExpertMapping) -> torch.Tensor:
    """[layers] the lowest top node load of any group-to-node packing (group locality 1.0).

    Each node takes between one group and as many as its slots hold; exact when such
    packings are few (`packing.MAX_PACKINGS`), else max(mean node load, heaviest group),
    which no packing beats either. Empty when groups cannot each sit on one node.
    """
    _loads(weight, mapping)
    topo = mapping.topology
    size = mapping.num_logical // topo.num_groups
    most = min(topo.num_groups, mapping.slots_per_gpu * topo.gpus_per_node // size)
    if mapping.num_logical % topo.num_groups or topo.num_groups < topo.num_nodes or most < 1:
        return torch.empty(0, dtype=torch.float64)
    table = torch.as_tensor(weight).to(torch.float64)
    return packing_bound(table.view(mapping.num_layers, topo.num_groups, -1).sum(-1), topo.num_nodes, most)


def locality_bound(weight: object, mapping: ExpertMapping) -> float:
    """The best balancedness any placement with group locality 1.0 can reach on this load.

    Sum over layers of the mean node load over sum over layers of the best packing's top
    node load (as `balancedness` sums GPU loads); 0.0 when groups cannot each sit on one
    node (fewer groups than nodes, or a group larger than a node's slots).
    """
    tops = layer_locality_bound(weight, mapping)
    if tops.numel() == 0:
        return 0.0
    mean = float(torch.as_tensor(weight).to(torch.float64).sum()) / mapping.topology.num_nodes
    top = float(tops.sum())
    return mean / top if top > 0 else 1.0
