"""rebalance_experts: request validation, versions, and the policy registry."""

from __future__ import annotations

import math

import pytest
import torch

from weightserve.eplb import (
    DEFAULT_POLICY,
    ExpertMapping,
    Policy,
    available_policies,
    policy_for,
    rebalance_experts,
    register_policy,
)
from weightserve.eplb.policies.base import POLICIES
from weightserve.eplb.problem import Problem
from weightserve.errors import InvalidRequestError

WEIGHT = [[10, 20, 30, 40], [5, 5, 5, 5]]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((6, 1, 1, 4), "num_replicas 6 is not a multiple of num_gpus 4"),
        ((8, 1, 3, 4), "num_gpus 4 is not a multiple of num_nodes 3"),
        ((2, 1, 1, 2), "num_replicas 2 < 4 logical experts"),
        ((8, 3, 1, 4), "4 logical experts do not split into 3 groups"),
        ((8, 0, 1, 4), "num_groups must be a positive integer, got 0"),
        ((8, 1, 1, 0), "num_gpus must be a positive integer, got 0"),
        ((8.0, 1, 1, 4), "num_replicas must be a positive integer, got 8.0"),
    ],
)
def test_inconsistent_sizes_are_rejected_with_their_numbers(args: tuple[int, int, int, int], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        rebalance_experts(WEIGHT, *args)


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        ([[1, -2, 3, 4]], r"non-negative; layer 0 expert 1 has -2.0"),
        ([[1, math.nan, 3, 4]], "NaN or infinite"),
        ([[1, math.inf, 3, 4]], "NaN or infinite"),
        ([1, 2, 3, 4], r"\[layers, experts\]"),
        (torch.zeros(0, 4), "layers >= 1"),
        ("tokens", "table of token counts"),
    ],
)
def test_bad_weights_are_rejected(weight: object, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        rebalance_experts(weight, 8, 1, 1, 4)


def test_errors_are_value_errors_too() -> None:
    with pytest.raises(ValueError, match="not a multiple"):
        rebalance_experts(WEIGHT, 6, 1, 1, 4)


def test_versions_count_up_from_the_previous_mapping() -> None:
    first = rebalance_experts(WEIGHT, 8, 2, 2, 4)
    assert first.version == 1
    assert first.topology.num_nodes == 2 and first.topology.gpus_per_node == 2 and first.topology.num_groups == 2
    second = rebalance_experts(WEIGHT, 8, 2, 2, 4, previous=first)
    assert second.version == 2
    start = ExpertMapping.initial(2, 4, 8, first.topology)
    assert rebalance_experts(WEIGHT, 8, 2, 2, 4, previous=start).version == 1


def test_a_previous_mapping_of_another_shape_is_rejected() -> None:
    other = rebalance_experts(WEIGHT, 12, 1, 1, 4)
    with pytest.raises(InvalidRequestError, match=r"previous \(2, 4, 12, 4\), request \(2, 4, 8, 4\)"):
        rebalance_experts(WEIGHT, 8, 1, 1, 4, previous=other)


def test_registry_names_the_built_in_policies() -> None:
    assert {"greedy", "hierarchical", "locality-aware"} <= set(available_policies())
    assert DEFAULT_POLICY == "hierarchical"
    assert policy_for("greedy").name == "greedy"
    with pytest.raises(InvalidRequestError, match=r"no EPLB policy 'best'; have \['greedy'"):
        rebalance_experts(WEIGHT, 8, 1, 1, 4, policy="best")


def test_a_registered_policy_is_used_by_name_and_its_output_is_checked() -> None:
    class RoundRobin(Policy):
        def place(self, problem: Problem, previous: ExpertMapping | None) -> torch.Tensor:
            slots = torch.arange(problem.num_physical) % problem.num_logical
            return slots.expand(problem.num_layers, -1).clone()

    try:
        register_policy("test-round-robin")(RoundRobin)
        m = rebalance_experts(WEIGHT, 8, 1, 1, 4, policy="test-round-robin")
        assert m.phy2log[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
        assert "test-round-robin" in available_policies()
    finally:
        POLICIES.unregister("test-round-robin")
    assert "test-round-robin" not in available_policies()

    class Broken(Policy):
        def place(self, problem: Problem, previous: ExpertMapping | None) -> torch.Tensor:
            return torch.zeros(problem.num_layers, problem.num_physical, dtype=torch.int64)

    with pytest.raises(InvalidRequestError, match="logical expert 1 has no replica"):
        rebalance_experts(WEIGHT, 8, 1, 1, 4, policy=Broken())


def test_rebalance_leaves_the_callers_thread_count_alone() -> None:
    before = torch.get_num_threads()
    rebalance_experts(WEIGHT, 8, 1, 1, 4)
    assert torch.get_num_threads() == before
