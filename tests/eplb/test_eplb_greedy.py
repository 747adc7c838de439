"""The DeepSeek baseline: the README example, and agreement with a loop-by-loop reference."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.eplb.eplb_cases import check_mapping, reference_greedy
from weightserve.eplb import rebalance_experts
from weightserve.eplb.policies.greedy import balanced_packing, replicate_experts
from weightserve.eplb.policies.hierarchical import HierarchicalPolicy

README_WEIGHT = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]
# deepseek-ai/EPLB README.md, "Interface and Example": print(phy2log) for 16 replicas,
# 4 groups, 2 nodes, 8 GPUs (hierarchical policy).
README_PHY2LOG = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]


def test_readme_example_from_the_greedy_policy() -> None:
    m = rebalance_experts(README_WEIGHT, 16, 4, 2, 8, policy="greedy")
    assert m.phy2log.tolist() == README_PHY2LOG
    check_mapping(m, 12, 16, 8)


def test_readme_example_from_the_hierarchical_greedy_stage() -> None:
    m = rebalance_experts(README_WEIGHT, 16, 4, 2, 8, policy=HierarchicalPolicy(refine=False))
    assert m.phy2log.tolist() == README_PHY2LOG


def test_readme_example_log2phy_and_counts() -> None:
    m = rebalance_experts(README_WEIGHT, 16, 4, 2, 8, policy="greedy")
    # Layer 0: expert 5 is in slots 0 and 2, expert 0 only in slot 12.
    assert m.log2phy[0, 5].tolist() == [0, 2]
    assert m.log2phy[0, 0].tolist() == [12, -1]
    assert m.logcnt[0].tolist() == [1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1]


def test_balanced_packing_fills_every_pack_evenly() -> None:
    weight = torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0, 3.0]])
    pack, rank = balanced_packing(weight, 3)
    assert sorted(pack[0].tolist()) == [0, 0, 1, 1, 2, 2]
    # Heaviest first to the lightest pack with room: 5->0, 4->1, 3->2, 3->2, 2->1, 1->0.
    assert pack[0].tolist() == [0, 0, 1, 1, 2, 2]
    assert rank[0].tolist() == [0, 1, 0, 1, 0, 1]


def test_replicate_gives_redundant_slots_to_the_highest_per_replica_load() -> None:
    phy2log, counts = replicate_experts(torch.tensor([[10.0, 4.0, 1.0]]), 6)
    # 10 -> (5, 4, 1): 0; (5, 4, 1) -> 0 again (3.33); then 1 (4 > 3.33).
    assert phy2log[0].tolist() == [0, 1, 2, 0, 0, 1]
    assert counts[0].tolist() == [3, 2, 1]


@st.composite
def greedy_problems(draw: st.DrawFn) -> tuple[list[list[int]], int, int, int, int]:
    nodes = draw(st.sampled_from([1, 2, 4]))
    gpus = nodes * draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 3, 4, 8]))
    experts = groups * draw(st.integers(1, 4))
    least = -(-experts // gpus)  # slots per GPU so that every expert fits
    physical = gpus * draw(st.integers(least, least + 2))
    layers = draw(st.integers(1, 3))
    weight = draw(
        st.lists(st.lists(st.integers(0, 300), min_size=experts, max_size=experts), min_size=layers, max_size=layers)
    )
    return weight, physical, groups, nodes, gpus


@settings(max_examples=60, deadline=None)
@given(greedy_problems())
def test_vectorised_greedy_matches_the_reference(case: tuple[list[list[int]], int, int, int, int]) -> None:
    weight, physical, groups, nodes, gpus = case
    m = rebalance_experts(weight, physical, groups, nodes, gpus, policy="greedy")
    assert m.phy2log.tolist() == reference_greedy(weight, physical, groups, nodes, gpus)
