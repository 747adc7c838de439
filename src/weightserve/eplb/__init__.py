"""Expert-parallel load balancing: token counts in, a versioned expert placement out.

Pure computation on CPU tensors; nothing here does I/O or imports grpc.

    >>> from weightserve.eplb import rebalance_experts, balancedness
    >>> m = rebalance_experts(weight, num_replicas=288, num_groups=8, num_nodes=4, num_gpus=32)
    >>> balancedness(weight, m)
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
