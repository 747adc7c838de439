"""Expert-parallel load balancing: token counts in, a versioned expert placement out.

Pure computation on CPU tensors; nothing here does I/O or imports grpc. Example:

    from weightserve.eplb import balancedness, rebalance_experts
    from weightserve.eplb.synthetic import zipf_load

    weight = zipf_load(58, 256, 1.2)  # [layers, experts] token counts
    mapping = rebalance_experts(weight, 288, num_groups=8, num_nodes=4, num_gpus=32)
    balancedness(weight, mapping)  # about 0.999; plain DeepSeek greedy gets about 0.50
    later = rebalance_experts(new_weight, 288, 8, 4, 32, policy="locality-aware", previous=mapping)
    later.delta(mapping, gpu=3)  # per layer, the slots GPU 3 must fetch
"""

from __future__ import annotations

from weightserve.eplb.mapping import ExpertMapping, Topology
from weightserve.eplb.metrics import (
    balancedness,
    bytes_moved,
    experts_moved,
    group_locality,
    layer_balancedness,
    layer_experts_moved,
    layer_max_mean_ratio,
    max_mean_ratio,
)
from weightserve.eplb.policies import DEFAULT_POLICY, Policy, available_policies, policy_for, register_policy
from weightserve.eplb.rebalance import rebalance_experts

__all__ = [
    "DEFAULT_POLICY",
    "ExpertMapping",
    "Policy",
    "Topology",
    "available_policies",
    "balancedness",
    "bytes_moved",
    "experts_moved",
    "group_locality",
    "layer_balancedness",
    "layer_experts_moved",
    "layer_max_mean_ratio",
    "max_mean_ratio",
    "policy_for",
    "rebalance_experts",
    "register_policy",
]
