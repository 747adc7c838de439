"""Every policy's invariants on random input, quality against a brute-force optimum,
and the default policy against the DeepSeek greedy baseline on skewed loads."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.eplb.eplb_cases import brute_force_top, check_mapping, top_load
from weightserve.eplb import balancedness, rebalance_experts
from weightserve.eplb.synthetic import lognormal_load, zipf_load

POLICIES = ["greedy", "hierarchical", "locality-aware"]


@st.composite
def requests(draw: st.DrawFn) -> tuple[torch.Tensor, int, int, int, int]:
    nodes = draw(st.sampled_from([1, 2, 3]))
    gpus = nodes * draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 3, 4]))
    experts = groups * draw(st.integers(1, 4))
    least = -(-experts // gpus)
    physical = gpus * draw(st.integers(least, least + 2))
    layers = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["counts", "zeros", "spike", "floats"]))
    if kind == "counts":
        cells = st.lists(st.integers(0, 1000), min_size=experts, max_size=experts)
        weight = torch.tensor(draw(st.lists(cells, min_size=layers, max_size=layers)), dtype=torch.float64)
    elif kind == "floats":
        reals = st.lists(st.floats(0, 1e9, allow_nan=False), min_size=experts, max_size=experts)
        weight = torch.tensor(draw(st.lists(reals, min_size=layers, max_size=layers)), dtype=torch.float64)
    else:
        weight = torch.zeros(layers, experts, dtype=torch.float64)
        if kind == "spike":
            weight[:, draw(st.integers(0, experts - 1))] = 1e6
    return weight, physical, groups, nodes, gpus


@settings(max_examples=40, deadline=None)
@given(requests(), st.sampled_from(POLICIES), st.booleans())
def test_every_policy_returns_a_consistent_mapping(
    case: tuple[torch.Tensor, int, int, int, int], policy: str, with_previous: bool
) -> None:
    weight, physical, groups, nodes, gpus = case
    previous = None
    if with_previous:
        previous = rebalance_experts(weight.flip(1), physical, groups, nodes, gpus)
    m = rebalance_experts(weight, physical, groups, nodes, gpus, policy=policy, previous=previous)
    check_mapping(m, weight.shape[1], physical, gpus)
    assert m.version == (1 if previous is None else previous.version + 1)


@settings(max_examples=25, deadline=None)
@given(requests())
def test_refined_policies_are_never_less_balanced_than_greedy(case: tuple[torch.Tensor, int, int, int, int]) -> None:
    weight, physical, groups, nodes, gpus = case
    greedy = balancedness(weight, rebalance_experts(weight, physical, groups, nodes, gpus, policy="greedy"))
    for policy in ("hierarchical", "locality-aware"):
        refined = rebalance_experts(weight, physical, groups, nodes, gpus, policy=policy)
        assert balancedness(weight, refined) >= greedy


def _tiny_cases(count: int, seed: int) -> list[tuple[list[float], int, int]]:
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        experts, gpus = rng.choice([4, 5, 6]), rng.choice([2, 2, 3])
        physical = rng.choice([p for p in range(experts, experts + 5) if p % gpus == 0])
        cases.append(([float(rng.randint(0, 100) ** 2) for _ in range(experts)], physical, gpus))
    return cases


TINY = _tiny_cases(40, seed=7)
# Measured over these 40 cases (1 layer, 4-6 experts, 2-3 GPUs): greedy is up to 1.33x
# the optimum (mean 1.049x, 13 exact); the refined policies stay within 1.127x (mean
# 1.017x) and hit the optimum exactly in 20 cases.
TOLERANCE = 1.15


@pytest.mark.parametrize("policy", ["hierarchical", "locality-aware"])
def test_refined_policies_are_near_the_brute_force_optimum(policy: str) -> None:
    ratios, exact = [], 0
    for weight, physical, gpus in TINY:
        best = brute_force_top(weight, physical, gpus)
        m = rebalance_experts([weight], physical, 1, 1, gpus, policy=policy)
        got = top_load(weight, m.phy2log[0].tolist(), gpus)
        greedy = rebalance_experts([weight], physical, 1, 1, gpus, policy="greedy")
        assert got <= top_load(weight, greedy.phy2log[0].tolist(), gpus) + 1e-9
        assert got <= best * TOLERANCE + 1e-9, (weight, physical, gpus, got, best)
        ratios.append(got / best if best else 1.0)
        exact += got <= best * (1 + 1e-9)
    assert sum(ratios) / len(ratios) <= 1.03
    assert exact >= len(TINY) * 0.4


def test_one_redundant_slot_too_many_for_the_hot_expert_is_given_back() -> None:
    # Greedy replicates expert 0 three times; on 2 GPUs x 3 slots two of its replicas
    # share a GPU (6667). The optimum gives it two replicas, one per GPU.
    weight = [10000.0, 100.0, 100.0, 1.0]
    greedy = rebalance_experts([weight], 6, 1, 1, 2, policy="greedy")
    assert top_load(weight, greedy.phy2log[0].tolist(), 2) == pytest.approx(6667.0, abs=1.0)
    m = rebalance_experts([weight], 6, 1, 1, 2)
    assert top_load(weight, m.phy2log[0].tolist(), 2) == brute_force_top(weight, 6, 2) == 5100.5


GRID = [
    # (loads, layers, experts, groups, nodes, gpus, physical)
    ("zipf", 6, 64, 4, 1, 8, 64),
    ("zipf", 6, 64, 8, 2, 16, 96),
    ("lognormal", 6, 64, 4, 2, 8, 80),
    ("zipf", 4, 128, 8, 4, 16, 160),
    ("lognormal", 4, 128, 8, 4, 32, 192),
    ("zipf", 4, 256, 8, 2, 32, 288),
    ("lognormal", 4, 256, 8, 4, 32, 384),
    ("zipf", 4, 128, 8, 3, 24, 168),  # 8 groups on 3 nodes: global balancing
]


@pytest.mark.parametrize(("kind", "layers", "experts", "groups", "nodes", "gpus", "physical"), GRID)
def test_default_policy_is_at_least_as_balanced_as_greedy_on_skewed_loads(
    kind: str, layers: int, experts: int, groups: int, nodes: int, gpus: int, physical: int
) -> None:
    for seed in (0, 1):
        if kind == "zipf":
            weight = zipf_load(layers, experts, 1.2 - 0.2 * seed, seed=seed)
        else:
            weight = lognormal_load(layers, experts, 1.0 + 0.5 * seed, seed=seed)
        greedy = balancedness(weight, rebalance_experts(weight, physical, groups, nodes, gpus, policy="greedy"))
        default = balancedness(weight, rebalance_experts(weight, physical, groups, nodes, gpus))
        assert default >= greedy


def test_default_policy_beats_greedy_by_a_fifth_with_groups_kept_and_by_a_third_relaxed() -> None:
    weight = zipf_load(58, 256, 1.2, seed=0)
    greedy = balancedness(weight, rebalance_experts(weight, 288, 8, 4, 32, policy="greedy"))
    default = balancedness(weight, rebalance_experts(weight, 288, 8, 4, 32))
    relaxed = balancedness(weight, rebalance_experts(weight, 288, 8, 4, 32, locality="relaxed"))
    # Measured: greedy 0.504, default 0.636 (1.26x, 0.99 of the locality bound), relaxed 0.999 (1.98x).
    assert default >= 1.2 * greedy
    assert relaxed >= 1.3 * greedy
