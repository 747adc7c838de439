"""Synthetic expert loads for tests, benchmarks and demos (seeded, reproducible).

Each layer draws its token counts from a multinomial over the experts, so counts are
integers that sum to `tokens` per layer. The expert popularity follows:

- `zipf_load`: Zipf's law over a random ranking of the experts (probability of the
  expert ranked r is proportional to r ** -exponent), a fresh ranking per layer;
- `lognormal_load`: probabilities proportional to exp(sigma * N(0, 1)).

`perturb` scales each count by exp(sigma * N(0, 1)), the drift between two
measurement windows.
"""

from __future__ import annotations

import numpy as np
import torch


def _draw(rng: np.random.Generator, probs: np.ndarray, tokens: int) -> torch.Tensor:
    rows = [rng.multinomial(tokens, row / row.sum()) for row in probs]
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def zipf_load(
    num_layers: int, num_experts: int, exponent: float, *, tokens: int = 1_000_000, seed: int = 0
) -> torch.Tensor:
    """[num_layers, num_experts] int64 token counts with Zipf(exponent) popularity."""
    rng = np.random.default_rng(seed)
    law = np.arange(1, num_experts + 1, dtype=np.float64) ** -exponent
    probs = np.stack([law[rng.permutation(num_experts)] for _ in range(num_layers)])
    return _draw(rng, probs, tokens)


def lognormal_load(
    num_layers: int, num_experts: int, sigma: float, *, tokens: int = 1_000_000, seed: int = 0
) -> torch.Tensor:
    """[num_layers, num_experts] int64 token counts with lognormal(sigma) popularity."""
    rng = np.random.default_rng(seed)
    probs = np.exp(sigma * rng.standard_normal((num_layers, num_experts)))
    return _draw(rng, probs, tokens)


def perturb(weight: torch.Tensor, sigma: float, *, seed: int = 0) -> torch.Tensor:
    """`weight` with each count scaled by exp(sigma * N(0, 1)), rounded, as int64."""
    rng = np.random.default_rng(seed)
    noise = torch.from_numpy(np.exp(sigma * rng.standard_normal(tuple(weight.shape))))
    return (weight.to(torch.float64) * noise).round().to(torch.int64)
