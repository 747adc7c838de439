"""Pipeline-parallel stages: which decoder layers each stage runs."""

from __future__ import annotations

import re

LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def stage_layers(num_layers: int, pp_rank: int, pp_size: int) -> range:
    """Decoder layers of stage `pp_rank`, split as vLLM's get_pp_indices does.

    Every stage gets num_layers // pp_size layers; the remainder goes one layer each
    to the stages before the last, starting from the second-to-last (the last stage
    also runs the final norm and lm_head).

    >>> [stage_layers(10, r, 4) for r in range(4)]
    [range(0, 2), range(2, 5), range(5, 8), range(8, 10)]
    """
    sizes = [num_layers // pp_size] * pp_size
    for i in range(2, num_layers % pp_size + 2):
        sizes[-i] += 1
    start = sum(sizes[:pp_rank])
    return range(start, start + sizes[pp_rank])


def layer_of(name: str) -> int | None:
    """The decoder layer a tensor belongs to, or None for embeddings, norms, heads."""
    match = LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None
