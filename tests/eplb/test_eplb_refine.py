"""The building blocks: swap refinement, slot rewrites, sticky packing, GPU matching."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weightserve.eplb.mapping import gpu_loads, held_by_gpu, replica_counts
from weightserve.eplb.refine import match_gpus, sticky_packing
from weightserve.eplb.refine.swaps import refine_swaps


@st.composite
def placements(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, int]:
    gpus = draw(st.integers(2, 5))
    logical = draw(st.integers(2, 10))
    per_gpu = draw(st.integers(-(-logical // gpus), -(-logical // gpus) + 2))
    layers = draw(st.integers(1, 3))
    rows, weights = [], []
    for _ in range(layers):
        extra = draw(
            st.lists(st.integers(0, logical - 1), min_size=per_gpu * gpus - logical, max_size=per_gpu * gpus - logical)
        )
        rows.append(draw(st.permutations(list(range(logical)) + extra)))
        weights.append(draw(st.lists(st.integers(0, 1000), min_size=logical, max_size=logical)))
    return torch.tensor(weights, dtype=torch.float64), torch.tensor(rows), gpus


@settings(max_examples=60, deadline=None)
@given(placements(), st.booleans())
def test_refinement_never_raises_a_layers_top_load(case: tuple[torch.Tensor, torch.Tensor, int], recount: bool) -> None:
    weight, phy2log, gpus = case
    out = refine_swaps(weight, phy2log, gpus, recount=recount)
    before = gpu_loads(weight, phy2log, gpus).max(dim=1).values
    after = gpu_loads(weight, out, gpus).max(dim=1).values
    assert bool((after <= before * (1 + 1e-12)).all())
    counts = replica_counts(out, weight.shape[1])
    assert int(counts.min()) >= 1
    if not recount:
        # Swaps alone keep every expert's replica count.
        assert torch.equal(counts, replica_counts(phy2log, weight.shape[1]))


def test_refinement_stops_at_its_target() -> None:
    weight = torch.tensor([[8.0, 4.0, 2.0, 1.0, 1.0, 0.0]])
    start = torch.tensor([[0, 1, 2, 3, 4, 5]])  # GPU loads 14 and 2
    met = refine_swaps(weight, start, 2, target=torch.tensor([14.0]), recount=False)
    assert torch.equal(met, start)
    best = refine_swaps(weight, start, 2, recount=False)
    assert gpu_loads(weight, best, 2).max() == 9.0  # {8, 1, 0} vs {4, 2, 1}: the optimum


def test_sticky_packing_keeps_counts_and_stays_put_when_free() -> None:
    weight = torch.tensor([[4.0, 4.0, 1.0, 1.0]])
    counts = torch.tensor([[1, 1, 1, 1]])
    before = held_by_gpu(torch.tensor([[1, 2, 0, 3]]), 4, 2)
    # Any slack: the two heavy experts each stay with their old GPU.
    out = sticky_packing(weight, counts, before, 2, torch.tensor([1.0]))
    assert torch.equal(replica_counts(out, 4), counts)
    assert torch.equal(held_by_gpu(out, 4, 2), before)
    # No slack: plain greedy packing (loads 5 and 5 either way).
    plain = sticky_packing(weight, counts, before, 2, torch.tensor([0.0]))
    assert gpu_loads(weight, plain, 2).tolist() == [[5.0, 5.0]]


def test_match_gpus_renumbers_without_changing_loads() -> None:
    new = torch.tensor([[2, 3, 0, 1, 4, 5]])
    old = torch.tensor([[0, 1, 4, 5, 2, 3]])
    out = match_gpus(new, old, 6, 3)
    assert out.tolist() == old.tolist()
    weight = torch.rand(1, 6, dtype=torch.float64)
    assert sorted(gpu_loads(weight, out, 3)[0].tolist()) == sorted(gpu_loads(weight, new, 3)[0].tolist())
