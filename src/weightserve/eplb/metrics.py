"""How good a mapping is: balance of GPU loads, and what moving to it costs.

A GPU's load is the tokens of the experts it holds, where a replicated expert's tokens
split evenly over its replicas. Balancedness is mean GPU load over max GPU load: 1.0 is
perfect. The overall figure sums over layers before dividing (sum of means over sum of
maxima), as vLLM logs it, so heavy layers count more than idle ones.

A move is a (layer, GPU, expert) the GPU holds now but did not hold before: the expert's
weights must travel to it once, however many of its slots hold that expert.
"""

from __future__ import annotations

import torch

from weightserve.eplb.mapping import ExpertMapping, gpu_loads, held_by_gpu
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
