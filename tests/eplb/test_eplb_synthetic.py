"""Synthetic loads are reproducible token counts."""

from __future__ import annotations

import torch

from weightserve.eplb.synthetic import lognormal_load, perturb, zipf_load


def test_loads_are_seeded_integer_counts_that_sum_per_layer() -> None:
    a = zipf_load(3, 16, 1.2, tokens=5000, seed=1)
    assert a.dtype == torch.int64 and a.shape == (3, 16)
    assert a.sum(dim=1).tolist() == [5000, 5000, 5000]
    assert torch.equal(a, zipf_load(3, 16, 1.2, tokens=5000, seed=1))
    assert not torch.equal(a, zipf_load(3, 16, 1.2, tokens=5000, seed=2))
    b = lognormal_load(2, 8, 1.0, tokens=100, seed=0)
    assert b.sum(dim=1).tolist() == [100, 100]


def test_zipf_is_skewed_and_perturb_keeps_the_shape() -> None:
    a = zipf_load(1, 256, 1.2, seed=0)
    assert int(a.max()) > 0.2 * int(a.sum())  # the top expert takes about a quarter
    p = perturb(a, 0.1, seed=0)
    assert p.shape == a.shape and p.dtype == torch.int64 and int(p.min()) >= 0
