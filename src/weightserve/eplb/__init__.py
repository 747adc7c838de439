"""Expert-parallel load balancing: token counts in, a versioned expert placement out.

Pure computation on CPU tensors; nothing here does I/O or imports grpc. Example:

    from weightserve.eplb import balancedness, dispatch_nodes, locality_bound, rebalance_experts
    from weightserve.eplb.synthetic import zipf_load

    weight = zipf_load(58, 256, 1.2)  # [layers, experts] token counts
    mapping = rebalance_experts(weight, 288, num_groups=8, num_nodes=4, num_gpus=32)
    balancedness(weight, mapping)  # about 0.64 with every group on one node; greedy about 0.50
    locality_bound(weight, mapping)  # about 0.64: the best any such placement reaches
    dispatch_nodes(weight, mapping, topk_group=4)  # nodes a token's dispatch reaches
    later = rebalance_experts(new_weight, 288, 8, 4, 32, policy="locality-aware", previous=mapping)
    later.delta(mapping, gpu=3)  # per layer, the slots GPU 3 must fetch
"""

from __future__ import annotations

from weightserve.eplb.mapping import ExpertMapping, Topology
from weightserve.eplb.metrics import (
    balancedness,
    bytes_moved,
    dispatch_nodes,
    experts_moved,
    group_locality,
    layer_balancedness,
    layer_dispatch_nodes,
    layer_experts_moved,
    layer_locality_bound,
    layer_max_mean_ratio,
    locality_bound,
    max_mean_ratio,
)
from weightserve.eplb.policies import DEFAULT_POLICY, Policy, available_policies, policy_for, register_policy
from weightserve.eplb.problem import LOCALITIES
from weightserve.eplb.rebalance import rebalance_experts

__all__ = [
    "DEFAULT_POLICY",
    "LOCALITIES",
    "ExpertMapping",
    "Policy",
    "Topology",
    "available_policies",
    "balancedness",
    "bytes_moved",
    "dispatch_nodes",
    "experts_moved",
    "group_locality",
    "layer_balancedness",
    "layer_dispatch_nodes",
    "layer_experts_moved",
    "layer_locality_bound",
    "layer_max_mean_ratio",
    "locality_bound",
    "max_mean_ratio",
    "policy_for",
    "rebalance_experts",
    "register_policy",
]
