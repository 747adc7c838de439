"""Placement policies behind one registry: `greedy`, `hierarchical`, `locality-aware`."""

from __future__ import annotations

from weightserve.eplb.policies.base import (
    DEFAULT_POLICY,
    Policy,
    available_policies,
    policy_for,
    register_policy,
    resolve_policy,
)

__all__ = ["DEFAULT_POLICY", "Policy", "available_policies", "policy_for", "register_policy", "resolve_policy"]
