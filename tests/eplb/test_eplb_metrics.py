"""Balancedness, max/mean, moves and bytes, checked against hand-computed figures."""

from __future__ import annotations

import pytest
import torch

from weightserve.eplb import (
    ExpertMapping,
    Topology,
    balancedness,
    bytes_moved,
    experts_moved,
    group_locality,
    layer_balancedness,
    layer_experts_moved,
    layer_max_mean_ratio,
    max_mean_ratio,
)
from weightserve.eplb.metrics import layer_loads
from weightserve.errors import InvalidRequestError

TOPO = Topology(num_nodes=1, gpus_per_node=2, num_groups=2)


def mapping(rows: list[list[int]], logical: int = 3, topo: Topology = TOPO) -> ExpertMapping:
    return ExpertMapping.from_phy2log(torch.tensor(rows), logical, topo, 1)


def test_replicas_split_their_experts_tokens_evenly() -> None:
    # Expert 0 (60 tokens) has two replicas, one per GPU: 30 each.
    m = mapping([[0, 1, 0, 2]])
    loads = layer_loads([[60, 10, 50]], m)
    assert loads.tolist() == [[40.0, 80.0]]
    assert layer_balancedness([[60, 10, 50]], m).tolist() == [pytest.approx(60 / 80)]


def test_overall_balancedness_sums_layers_before_dividing() -> None:
    m = mapping([[0, 1, 0, 2], [0, 1, 2, 0]])
    weight = [[60, 10, 50], [0, 100, 100]]
    # Layer 0: loads (40, 80); layer 1: expert 0 idle, loads (100, 100).
    assert balancedness(weight, m) == pytest.approx((60 + 100) / (80 + 100))
    assert max_mean_ratio(weight, m) == pytest.approx((80 + 100) / (60 + 100))
    assert layer_max_mean_ratio(weight, m).tolist() == [pytest.approx(80 / 60), pytest.approx(1.0)]


def test_a_layer_without_tokens_counts_as_balanced() -> None:
    m = mapping([[0, 1, 0, 2]])
    assert balancedness([[0, 0, 0]], m) == 1.0
    assert layer_balancedness([[0, 0, 0]], m).tolist() == [1.0]


def test_weight_must_match_the_mapping() -> None:
    with pytest.raises(InvalidRequestError, match=r"weight shape \[1, 4\]"):
        balancedness([[1, 2, 3, 4]], mapping([[0, 1, 0, 2]]))


def test_moves_count_experts_new_to_a_gpu_once_and_bytes_scale_them() -> None:
    before = mapping([[0, 1, 2, 0], [0, 1, 2, 0]])
    after = mapping([[2, 2, 0, 1], [0, 1, 2, 0]])
    # Layer 0: GPU 0 gains expert 2 (in two slots: one move), GPU 1 gains expert 1.
    assert layer_experts_moved(before, after).tolist() == [2, 0]
    assert experts_moved(before, after) == 2
    assert bytes_moved(before, after, bytes_per_expert=1000) == 2000
    assert experts_moved(after, after) == 0
    with pytest.raises(InvalidRequestError, match="bytes_per_expert must be >= 0"):
        bytes_moved(before, after, -1)


def test_group_locality_is_one_when_groups_stay_on_one_node() -> None:
    topo = Topology(num_nodes=2, gpus_per_node=1, num_groups=2)
    together = mapping([[0, 1, 2, 3]], logical=4, topo=topo)
    assert group_locality(together) == 1.0
    split = mapping([[0, 2, 1, 3]], logical=4, topo=topo)
    assert group_locality(split) == 0.5
