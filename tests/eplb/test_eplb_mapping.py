"""ExpertMapping: the initial layout, derived tables, per-GPU views and deltas."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.eplb.eplb_cases import check_mapping
from weightserve.eplb import ExpertMapping, Topology
from weightserve.errors import InvalidRequestError


def test_initial_layout_is_contiguous_blocks_with_wrapped_redundant_slots() -> None:
    m = ExpertMapping.initial(2, 6, 10, Topology(num_nodes=1, gpus_per_node=2, num_groups=2))
    assert m.version == 0
    assert m.phy2log[0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    assert torch.equal(m.phy2log[0], m.phy2log[1])
    assert m.experts_on_gpu(1, 0) == [0, 1, 2, 3, 4]
    assert m.experts_on_gpu(1, 1) == [5, 0, 1, 2, 3]
    assert m.logcnt[0].tolist() == [2, 2, 2, 2, 1, 1]
    assert m.log2phy[0, 0].tolist() == [0, 6]
    assert m.log2phy[0, 5].tolist() == [5, -1]
    check_mapping(m, 6, 10, 2)


def test_initial_wraps_more_than_once_when_slots_exceed_twice_the_experts() -> None:
    m = ExpertMapping.initial(1, 2, 6, Topology(num_nodes=1, gpus_per_node=3))
    assert m.phy2log[0].tolist() == [0, 1, 0, 1, 0, 1]
    assert m.gpu_slots(2) == range(4, 6)


@pytest.mark.parametrize(
    ("layers", "logical", "physical", "gpus", "message"),
    [
        (1, 8, 6, 2, "num_physical >= num_logical"),
        (1, 4, 6, 4, "do not divide over 4 GPUs"),
        (1, 0, 4, 2, "num_logical >= 1"),
    ],
)
def test_initial_rejects_impossible_layouts(layers: int, logical: int, physical: int, gpus: int, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        ExpertMapping.initial(layers, logical, physical, Topology(num_nodes=1, gpus_per_node=gpus))


def test_from_phy2log_rejects_missing_experts_and_bad_ids() -> None:
    topo = Topology(num_nodes=1, gpus_per_node=2)
    with pytest.raises(InvalidRequestError, match="logical expert 2 has no replica in layer 0"):
        ExpertMapping.from_phy2log(torch.tensor([[0, 1, 0, 1]]), 3, topo, 1)
    with pytest.raises(InvalidRequestError, match=r"outside \[0, 3\)"):
        ExpertMapping.from_phy2log(torch.tensor([[0, 1, 2, 3]]), 3, topo, 1)
    with pytest.raises(InvalidRequestError, match="do not divide over 2 GPUs"):
        ExpertMapping.from_phy2log(torch.tensor([[0, 1, 2]]), 3, topo, 1)


def test_topology_rejects_non_positive_sizes() -> None:
    with pytest.raises(InvalidRequestError, match="gpus_per_node must be a positive integer"):
        Topology(num_nodes=1, gpus_per_node=0)
    assert Topology(num_nodes=2, gpus_per_node=4).num_gpus == 8


def test_experts_on_gpu_checks_its_arguments() -> None:
    m = ExpertMapping.initial(1, 4, 4, Topology(num_nodes=1, gpus_per_node=2))
    with pytest.raises(InvalidRequestError, match="gpu 2 >= num_gpus 2"):
        m.experts_on_gpu(0, 2)
    with pytest.raises(InvalidRequestError, match="layer 1 out of range"):
        m.experts_on_gpu(1, 0)


def test_delta_lists_slots_whose_expert_is_new_to_the_gpu() -> None:
    topo = Topology(num_nodes=1, gpus_per_node=2)
    before = ExpertMapping.from_phy2log(torch.tensor([[0, 1, 2, 3]]), 4, topo, 1)
    after = ExpertMapping.from_phy2log(torch.tensor([[1, 2, 3, 0]]), 4, topo, 2)
    # GPU 0 held {0, 1}: slot 0 (expert 1) is kept, slot 1 (expert 2) is new.
    assert after.delta(before, 0) == [[1]]
    # GPU 1 held {2, 3}: slot 2 (expert 3) is kept, slot 3 (expert 0) is new.
    assert after.delta(before, 1) == [[3]]
    assert after.delta(after, 0) == [[]]


def test_delta_is_a_set_difference_so_a_new_expert_in_two_slots_is_listed_twice() -> None:
    topo = Topology(num_nodes=1, gpus_per_node=2)
    before = ExpertMapping.from_phy2log(torch.tensor([[0, 1, 2, 2]]), 3, topo, 1)
    after = ExpertMapping.from_phy2log(torch.tensor([[2, 2, 0, 1]]), 3, topo, 2)
    assert after.delta(before, 0) == [[0, 1]]
    assert after.delta(before, 1) == [[2, 3]]


def test_delta_rejects_a_mapping_of_another_shape() -> None:
    small = ExpertMapping.initial(1, 4, 4, Topology(num_nodes=1, gpus_per_node=2))
    big = ExpertMapping.initial(1, 4, 6, Topology(num_nodes=1, gpus_per_node=2))
    with pytest.raises(InvalidRequestError, match="mappings differ"):
        big.delta(small, 0)


@st.composite
def slot_tables(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    gpus = draw(st.integers(1, 4))
    logical = draw(st.integers(1, 8))
    per_gpu = draw(st.integers(-(-logical // gpus), -(-logical // gpus) + 3))
    layers = draw(st.integers(1, 3))

    def table() -> torch.Tensor:
        rows = []
        for _ in range(layers):
            extra = draw(
                st.lists(
                    st.integers(0, logical - 1), min_size=per_gpu * gpus - logical, max_size=per_gpu * gpus - logical
                )
            )
            rows.append(draw(st.permutations(list(range(logical)) + extra)))
        return torch.tensor(rows)

    return table(), table(), logical, gpus


@settings(max_examples=80, deadline=None)
@given(slot_tables())
def test_derived_tables_and_deltas_agree_with_a_direct_count(case: tuple[torch.Tensor, torch.Tensor, int, int]) -> None:
    old, new, logical, gpus = case
    topo = Topology(num_nodes=1, gpus_per_node=gpus)
    before = ExpertMapping.from_phy2log(old, logical, topo, 3)
    after = ExpertMapping.from_phy2log(new, logical, topo, 4)
    check_mapping(after, logical, new.shape[1], gpus)
    per_gpu = after.slots_per_gpu
    for gpu in range(gpus):
        slots = range(gpu * per_gpu, (gpu + 1) * per_gpu)
        for layer, listed in enumerate(after.delta(before, gpu)):
            had = {int(old[layer, p]) for p in slots}
            assert listed == [p for p in slots if int(new[layer, p]) not in had]
            assert after.experts_on_gpu(layer, gpu) == [int(new[layer, p]) for p in slots]
