"""locality-aware: fewer moves than a from-scratch placement at no loss of balance."""

from __future__ import annotations

import pytest
import torch

from weightserve.eplb import balancedness, experts_moved, group_locality, rebalance_experts
from weightserve.eplb.policies.locality import choose
from weightserve.eplb.synthetic import lognormal_load, perturb, zipf_load

CASES = [
    # (weight, num_replicas, num_groups, num_nodes, num_gpus)
    (zipf_load(16, 128, 1.1, seed=3), 160, 8, 2, 16),
    (lognormal_load(16, 64, 1.0, seed=4), 96, 4, 2, 16),
    (zipf_load(8, 256, 1.2, seed=5), 288, 8, 4, 32),
]


@pytest.mark.parametrize("locality", ["group", "relaxed"])
@pytest.mark.parametrize(("weight", "replicas", "groups", "nodes", "gpus"), CASES)
def test_locality_moves_fewer_experts_than_from_scratch_at_equal_or_better_balance(
    weight: torch.Tensor, replicas: int, groups: int, nodes: int, gpus: int, locality: str
) -> None:
    args = (replicas, groups, nodes, gpus)
    previous = rebalance_experts(perturb(weight, 0.2, seed=9), *args, locality=locality)
    scratch = rebalance_experts(weight, *args, previous=previous, locality=locality)
    local = rebalance_experts(weight, *args, policy="locality-aware", previous=previous, locality=locality)
    assert balancedness(weight, local) >= balancedness(weight, scratch)
    assert experts_moved(previous, local) < 0.75 * experts_moved(previous, scratch)
    if locality == "group":  # the moves saved never cost the constraint
        assert group_locality(local) == 1.0


def test_locality_moves_nothing_when_the_load_has_not_changed() -> None:
    weight = zipf_load(8, 64, 1.0, seed=1)
    previous = rebalance_experts(weight, 80, 4, 2, 16)
    again = rebalance_experts(weight, 80, 4, 2, 16, policy="locality-aware", previous=previous)
    assert experts_moved(previous, again) == 0
    assert torch.equal(again.phy2log, previous.phy2log)


def test_relaxed_locality_without_previous_keeps_groups_together_more_than_hierarchical() -> None:
    weight = zipf_load(16, 256, 1.2, seed=0)
    hierarchical = rebalance_experts(weight, 288, 8, 4, 32, locality="relaxed")
    local = rebalance_experts(weight, 288, 8, 4, 32, policy="locality-aware", locality="relaxed")
    greedy = rebalance_experts(weight, 288, 8, 4, 32, policy="greedy")
    assert group_locality(local) > group_locality(hierarchical)
    assert balancedness(weight, local) >= 1.3 * balancedness(weight, greedy)


def test_choose_takes_the_fewest_moves_that_keep_the_summed_top_load() -> None:
    # Options per layer: 0 = cheap but above target in layer 1, 1 = at target everywhere.
    tops = torch.tensor([[9.0, 12.0, 10.0], [10.0, 10.0, 10.0]])
    moves = torch.tensor([[1, 1, 1], [5, 5, 5]])
    target = torch.tensor([10.0, 10.0, 10.0])
    # Layer 0's slack (1.0) cannot pay layer 1's excess (2.0): layer 1 takes option 1.
    assert choose(tops, moves, target).tolist() == [0, 1, 0]
    # With more slack in layer 0, the cheap option fits everywhere.
    tops[0, 0] = 7.0
    assert choose(tops, moves, target).tolist() == [0, 0, 0]
