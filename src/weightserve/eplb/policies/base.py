"""The policy interface and the registry that names policies.

A policy turns a validated Problem (and optionally the mapping in force) into a slot
table phy2log; `rebalance_experts` derives the rest of the mapping and checks the
invariants, so a policy only has to say which expert goes in which slot. Built-in
policies register themselves when their module is imported, which `policy_for` does on
first use.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch

from weightserve.eplb.mapping import ExpertMapping
from weightserve.eplb.problem import Problem
from weightserve.errors import InvalidRequestError
from weightserve.registry import Registry

DEFAULT_POLICY = "hierarchical"


class Policy(ABC):
    """Decides which logical expert each physical slot holds.

    Implementations must give every logical expert at least one slot and fill every
    slot; slots are already spread evenly over GPUs by the slot numbering.
    """

    name: ClassVar[str] = ""

    @abstractmethod
    def place(self, problem: Problem, previous: ExpertMapping | None) -> torch.Tensor:
        """Return phy2log, [layers, num_physical] int64, for `problem`.

        Args:
            problem: the validated load table, slot budget and topology.
            previous: the mapping in force, already checked to match the problem's
                shape; policies that limit moves start from it, others ignore it.
        """


POLICIES: Registry[type[Policy]] = Registry(
    "EPLB policy",
    {
        "greedy": "weightserve.eplb.policies.greedy",
        "hierarchical": "weightserve.eplb.policies.hierarchical",
        "locality-aware": "weightserve.eplb.policies.locality",
    },
)


def register_policy(name: str) -> Callable[[type[Policy]], type[Policy]]:
    """Class decorator: make `cls` the policy called `name`."""

    def wrap(cls: type[Policy]) -> type[Policy]:
        cls.name = name
        return POLICIES.register(name)(cls)

    return wrap


def available_policies() -> list[str]:
    """Every policy name `policy_for` accepts."""
    return POLICIES.names()


def policy_for(name: str) -> type[Policy]:
    """The policy class registered as `name`, importing its module on first use.

    Raises:
        UnknownNameError: no policy has that name (an InvalidRequestError).
    """
    return POLICIES.get(name)


def resolve_policy(policy: str | Policy | None) -> Policy:
    """A Policy instance from a name, an instance, or None (the default policy)."""
    if isinstance(policy, Policy):
        return policy
    if policy is None:
        policy = DEFAULT_POLICY
    if not isinstance(policy, str):
        raise InvalidRequestError(f"policy must be a name or a Policy, got {type(policy).__name__}")
    return policy_for(policy)()
