"""Locality "group": every expert group, with all its replicas, on one node; the trade-off measured."""

from __future__ import annotations

import hashlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.eplb.eplb_cases import check_mapping
from weightserve.eplb import (
    ExpertMapping,
    Topology,
    balancedness,
    dispatch_nodes,
    group_locality,
    layer_dispatch_nodes,
    locality_bound,
    rebalance_experts,
)
from weightserve.eplb.packing import all_packings, best_packing, improve_packing, node_loads, packing_bound
from weightserve.eplb.policies.grouped import sized_counts
from weightserve.eplb.synthetic import lognormal_load, zipf_load
from weightserve.errors import InvalidRequestError


def groups_on_one_node(m: ExpertMapping) -> bool:
    """Every replica of every group sits on one node, the same for the whole group."""
    per_node = m.num_physical // m.topology.num_nodes
    node = torch.arange(m.num_physical) // per_node
    group = m.phy2log // (m.num_logical // m.topology.num_groups)
    for layer in range(m.num_layers):
        homes: dict[int, int] = {}
        for slot in range(m.num_physical):
            if homes.setdefault(int(group[layer, slot]), int(node[slot])) != int(node[slot]):
                return False
    return True


@st.composite
def grouped_requests(draw: st.DrawFn) -> tuple[torch.Tensor, int, int, int, int]:
    """Shapes whose groups divide over nodes (nodes > 1), with several skews."""
    nodes = draw(st.sampled_from([2, 3, 4]))
    groups = nodes * draw(st.integers(1, 3))
    gpus = nodes * draw(st.integers(1, 3))
    experts = groups * draw(st.integers(1, 4))
    # Each node's slots hold its groups: at least experts / nodes slots per node.
    least = max(-(-experts // gpus), 1)
    physical = gpus * draw(st.integers(least, least + 3))
    layers = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["zipf", "lognormal", "spike", "zeros"]))
    seed = draw(st.integers(0, 50))
    if kind == "zipf":
        weight = zipf_load(layers, experts, draw(st.sampled_from([0.8, 1.2, 2.0])), seed=seed).double()
    elif kind == "lognormal":
        weight = lognormal_load(layers, experts, draw(st.sampled_from([0.5, 1.5])), seed=seed).double()
    else:
        weight = torch.zeros(layers, experts, dtype=torch.float64)
        if kind == "spike":
            weight[:, draw(st.integers(0, experts - 1))] = 1e6
    return weight, physical, groups, nodes, gpus


@settings(max_examples=40, deadline=None)
@given(grouped_requests(), st.sampled_from(["hierarchical", "locality-aware"]), st.booleans())
def test_every_replica_stays_on_its_groups_node(
    case: tuple[torch.Tensor, int, int, int, int], policy: str, relaxed_previous: bool
) -> None:
    weight, physical, groups, nodes, gpus = case
    previous = None
    if relaxed_previous:  # a previous mapping that spreads groups must not leak into the new one
        previous = rebalance_experts(weight.flip(1), physical, groups, nodes, gpus, locality="relaxed")
    m = rebalance_experts(weight, physical, groups, nodes, gpus, policy=policy, previous=previous)
    check_mapping(m, weight.shape[1], physical, gpus)
    assert groups_on_one_node(m)
    assert group_locality(m) == 1.0


@settings(max_examples=30, deadline=None)
@given(grouped_requests())
def test_under_the_constraint_the_default_is_never_less_balanced_than_greedy_nor_above_the_bound(
    case: tuple[torch.Tensor, int, int, int, int],
) -> None:
    # relaxed is DeepSeek's unconstrained heuristic, usually better balanced but not always
    # (6 one-expert groups on 2 nodes x 4 GPUs: 0.929 against the default's 0.986), so it is
    # compared on the DeepSeek-V3 shape only, in test_relaxed_trades_locality_for_balance.
    weight, physical, groups, nodes, gpus = case
    greedy = rebalance_experts(weight, physical, groups, nodes, gpus, policy="greedy")
    default = rebalance_experts(weight, physical, groups, nodes, gpus)
    assert groups_on_one_node(greedy)  # greedy already keeps the constraint: same footing
    assert balancedness(weight, default) >= balancedness(weight, greedy) * (1 - 1e-9)  # equal up to summation order
    assert balancedness(weight, default) <= locality_bound(weight, default) * (1 + 1e-9)


def test_the_deepseek_v3_shape_keeps_groups_on_one_node_and_reaches_the_locality_bound() -> None:
    weight = zipf_load(58, 256, 1.2, seed=0)
    shape = (288, 8, 4, 32)
    greedy = rebalance_experts(weight, *shape, policy="greedy")
    default = rebalance_experts(weight, *shape)
    relaxed = rebalance_experts(weight, *shape, locality="relaxed")
    bound = locality_bound(weight, default)
    assert group_locality(default) == 1.0 and groups_on_one_node(default)
    # Measured: greedy 0.784 of the bound (0.504), the default 0.990 (0.636).
    assert balancedness(weight, greedy) < 0.85 * bound
    assert balancedness(weight, default) >= 0.95 * bound
    # Relaxed keeps today's figure (0.999) by spreading groups, and a token reaches more nodes.
    assert balancedness(weight, relaxed) >= 0.99
    assert group_locality(relaxed) < 0.5
    assert dispatch_nodes(weight, relaxed, 4) > dispatch_nodes(weight, default, 4)
    assert dispatch_nodes(weight, default, 4) <= 4.0


# sha256 prefixes of phy2log from the code before locality existed (commit of issue 17's
# start), which always placed this way.
OLD = [
    (zipf_load(6, 64, 1.2, seed=2), (96, 8, 2, 16), "3d05e309043d39fa", "c52e0438a2b42374"),
    (lognormal_load(4, 128, 1.0, seed=3), (160, 8, 4, 16), "7cc8a8daf552044c", "ed87a215568fe070"),
]


@pytest.mark.parametrize(("weight", "shape", "hierarchical", "local"), OLD)
def test_relaxed_reproduces_the_old_cross_node_placement(
    weight: torch.Tensor, shape: tuple[int, int, int, int], hierarchical: str, local: str
) -> None:
    for policy, digest in (("hierarchical", hierarchical), ("locality-aware", local)):
        m = rebalance_experts(weight, *shape, policy=policy, locality="relaxed")
        assert hashlib.sha256(m.phy2log.numpy().tobytes()).hexdigest()[:16] == digest
        assert group_locality(m) < 1.0


@pytest.mark.parametrize(("groups", "nodes"), [(3, 2), (1, 2), (4, 8)])
def test_groups_that_do_not_divide_over_nodes_fall_back_to_global_balancing(groups: int, nodes: int) -> None:
    weight = zipf_load(4, 48, 1.2, seed=1)
    args = (64, groups, nodes, 16)
    for policy in ("hierarchical", "locality-aware"):
        group = rebalance_experts(weight, *args, policy=policy)
        relaxed = rebalance_experts(weight, *args, policy=policy, locality="relaxed")
        assert torch.equal(group.phy2log, relaxed.phy2log)
    greedy = rebalance_experts(weight, *args, policy="greedy")
    assert balancedness(weight, group) >= balancedness(weight, greedy)


def test_an_unknown_locality_is_rejected_naming_the_field() -> None:
    with pytest.raises(InvalidRequestError, match=r"locality must be one of \['group', 'relaxed'\], got 'node'"):
        rebalance_experts([[1, 2, 3, 4]], 4, 2, 2, 2, locality="node")


def test_dispatch_nodes_follows_the_stated_model() -> None:
    topo = Topology(num_nodes=2, gpus_per_node=1, num_groups=2)
    weight = [[30, 10, 40, 20]]  # groups {0, 1}: 40 tokens, {2, 3}: 60
    together = ExpertMapping.from_phy2log(torch.tensor([[0, 1, 2, 3]]), 4, topo, 1)
    # topk_group 1: group 0 picked with p 0.4, group 1 with 0.6; each lives on one node.
    assert layer_dispatch_nodes(weight, together, 1).tolist() == [pytest.approx(1.0)]
    split = ExpertMapping.from_phy2log(torch.tensor([[0, 2, 1, 3]]), 4, topo, 1)
    # Both groups on both nodes: any pick reaches both nodes, 1 - 0.6 * 0.4 per node.
    assert dispatch_nodes(weight, split, 1) == pytest.approx(2 * (1 - 0.6 * 0.4))
    # topk_group 2: group 0 with p min(1, 0.8), group 1 with min(1, 1.2) = 1.
    assert dispatch_nodes(weight, together, 2) == pytest.approx(0.8 + 1.0)
    with pytest.raises(InvalidRequestError, match=r"topk_group must be an integer in \[1, 2\], got 3"):
        dispatch_nodes(weight, together, 3)


def test_the_locality_bound_is_the_best_group_packing() -> None:
    topo = Topology(num_nodes=2, gpus_per_node=1, num_groups=4)
    m = ExpertMapping.from_phy2log(torch.tensor([[0, 1, 2, 3]]), 4, topo, 1)
    # Groups of 50, 30, 20, 0 on two nodes of two slots: {50} + {30, 20} is not allowed
    # (a node holds at most 2 groups, at least 1): best is {50, 0} and {30, 20}.
    assert locality_bound([[50, 30, 20, 0]], m) == pytest.approx(50 / 50)
    assert locality_bound([[60, 30, 20, 0]], m) == pytest.approx(55 / 60)


def test_packings_are_listed_once_and_the_best_is_exact() -> None:
    listed = all_packings(8, 4, 2, 2)
    assert listed is not None and listed.shape == (105, 8)  # 8! / (2!^4 4!)
    assert len({tuple(row.tolist()) for row in listed}) == 105
    load = zipf_load(5, 8, 1.0, seed=4).double()
    start = torch.arange(8).expand(5, -1) % 4
    best = best_packing(load, 4, start)
    tops = node_loads(load, best, 4).max(dim=-1).values
    assert torch.allclose(tops, packing_bound(load, 4, 2))
    improved = improve_packing(load, start, 4)
    assert bool(
        (node_loads(load, improved, 4).max(dim=-1).values <= node_loads(load, start, 4).max(dim=-1).values).all()
    )
    assert torch.equal(torch.bincount(improved[0], minlength=4), torch.full((4,), 2))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(0, 10_000), min_size=2, max_size=12),
    st.integers(1, 4),
    st.integers(0, 30),
    st.sampled_from([1.0, 1.1, 2.0]),
)
def test_sized_counts_fill_every_slot_and_cap_a_hot_expert_at_the_gpus(
    loads: list[int], gpus: int, spare: int, factor: float
) -> None:
    weight = torch.tensor([loads], dtype=torch.float64)
    slots = len(loads) + spare
    counts = sized_counts(weight, slots, gpus, factor)
    assert int(counts.sum()) == slots and int(counts.min()) >= 1
    # The hottest expert never gets more replicas than GPUs while it needs no more.
    hottest = int(weight.argmax())
    assert int(counts[0, hottest]) <= max(gpus, -(-slots // len(loads)))


def test_a_spread_previous_node_missing_one_of_its_experts_is_not_kept() -> None:
    # Found by the property test above: the relaxed previous mapping left node 0 holding
    # only its own experts but not every one of them (expert 3 lived elsewhere); keeping
    # that node dropped expert 3 from layer 0 altogether.
    weight = torch.tensor(
        [
            [175125, 17408, 77803, 47290, 49939, 56652, 22811, 55947, 40872, 332599, 70619, 52935],
            [67243, 55222, 45317, 63165, 98516, 68035, 124441, 70293, 78367, 167627, 101694, 60080],
            [60788, 86712, 173624, 57815, 58738, 109377, 42396, 57074, 102946, 88818, 69456, 92256],
        ],
        dtype=torch.float64,
    )
    shape = (18, 6, 3, 9)
    previous = rebalance_experts(weight.flip(1), *shape, locality="relaxed")
    m = rebalance_experts(weight, *shape, policy="locality-aware", previous=previous)
    check_mapping(m, weight.shape[1], 18, 9)
    assert group_locality(m) == 1.0
