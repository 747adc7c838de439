"""What a saved per-rank directory holds: which tensors, in which part files.

Pure functions over plans and sizes; `saved.py` writes what they decide and
`saved_check.py` checks a directory against it.
"""

from __future__ import annotations

import bisect
import functools
import heapq
import sys
from dataclasses import dataclass, replace

from weightserve.errors import InvalidRequestError
from weightserve.loaders.base import TensorRecord
from weightserve.loaders.pieces import ZEROS
from weightserve.sharding.model_config import ModelConfig
from weightserve.sharding.plan import plan_shard
from weightserve.sharding.rules import RuleSet
from weightserve.sharding.spec import ShardSpec
from weightserve.sharding.tensor_plan import TensorPlan

Run = tuple[int, int, int]
"""(source, start, end): bytes of one source."""


def _runs(plan: TensorPlan) -> list[Run]:
    """The source bytes a plan reads, sorted and merged (padding reads none)."""
    runs = sorted(
        (p.source, p.offset + row * p.stride, p.offset + row * p.stride + p.row_bytes)
        for p in plan.pieces
        if p.source != ZEROS and p.nbytes
        for row in range(p.rows)
    )
    merged: list[Run] = []
    for source, start, end in runs:
        if merged and merged[-1][0] == source and merged[-1][2] >= start:
            merged[-1] = (source, merged[-1][1], max(merged[-1][2], end))
        else:
            merged.append((source, start, end))
    return merged


def _covers(outer: list[Run], inner: list[Run]) -> bool:
    """Whether every byte of `inner` is in `outer` (both merged)."""
    for source, start, end in inner:
        at = bisect.bisect_right(outer, (source, start, sys.maxsize)) - 1
        if at < 0 or outer[at][0] != source or outer[at][2] < end:
            return False
    return True


def _overlapping_pairs(plans: list[TensorPlan]) -> set[tuple[int, int]]:
    """Index pairs of plans whose source extents overlap (candidates for sharing storage)."""
    extents = sorted(
        (p.source, p.offset, p.offset + (p.rows - 1) * p.stride + p.row_bytes, i)
        for i, plan in enumerate(plans)
        for p in plan.pieces
        if p.source != ZEROS and p.nbytes
    )
    pairs: set[tuple[int, int]] = set()
    active: list[tuple[int, int, int]] = []  # (source, end, plan index) of extents still open
    for source, start, end, i in extents:
        active = [a for a in active if a[0] == source and a[1] > start]
        pairs.update((min(i, j), max(i, j)) for _, _, j in active if j != i)
        active.append((source, end, i))
    return pairs


def _preferred(a: TensorPlan, b: TensorPlan) -> bool:
    """Whether `a` is kept over `b` when one holds the other: larger, then first name."""
    return (a.nbytes, b.name) > (b.nbytes, a.name)


def filter_shared(plans: list[TensorPlan]) -> list[TensorPlan]:
    """Drop every plan whose bytes another plan already holds, as vLLM's `_filter_subtensors` does.

    Tensors that share storage (a `.bin` checkpoint's tied `embed_tokens` and
    `lm_head`) would otherwise be saved twice. A plan is dropped when another plan
    reads all of its source bytes and is larger, or is the same size and has the
    name that sorts first (the one vLLM keeps, so its loader finds what it expects).
    Plans that only partly overlap are both kept: neither holds the other's bytes.

    >>> from weightserve.loaders.pieces import Piece
    >>> a = TensorPlan("model.embed_tokens.weight", "F32", (2,), (Piece(0, 0, 8),))
    >>> [p.name for p in filter_shared([a, TensorPlan("lm_head.weight", "F32", (2,), a.pieces)])]
    ['lm_head.weight']
    """
    runs = functools.cache(lambda i: _runs(plans[i]))  # only plans that overlap another are expanded
    dropped: set[int] = set()
    for i, j in sorted(_overlapping_pairs(plans)):
        for small, big in ((i, j), (j, i)):
            if _preferred(plans[big], plans[small]) and _covers(runs(big), runs(small)):
                dropped.add(small)
    return [plan for i, plan in enumerate(plans) if i not in dropped]


def balance_parts(sizes: list[int], max_part_size: int | None = None) -> list[list[int]]:
    """Assign tensors (by index) to part files, largest first into the lightest part.

    Without a cap everything goes in one part. With one, a tensor larger than the cap
    gets a part of its own; the rest start in ceil(total / cap) parts and a new part
    opens when even the lightest cannot take the next tensor. Each part lists its
    indices in ascending order; parts are ordered by their first index, so part 0
    holds the first tensor. There is always at least one part (possibly empty).

    >>> balance_parts([5, 1, 4, 2], max_part_size=6)
    [[0, 1], [2, 3]]
    """
    if max_part_size is not None and max_part_size < 1:
        raise InvalidRequestError(f"max_part_size {max_part_size} must be >= 1")
    if max_part_size is None or not sizes:
        return [list(range(len(sizes)))]
    alone = [[i] for i, size in enumerate(sizes) if size > max_part_size]
    rest = [i for i, size in enumerate(sizes) if size <= max_part_size]
    total = sum(sizes[i] for i in rest)
    count = max(1, -(-total // max_part_size)) if rest else 0
    heap = [(0, part) for part in range(count)]  # (bytes, part index): lightest first
    parts: list[list[int]] = [[] for _ in range(count)]
    for i in sorted(rest, key=lambda i: (-sizes[i], i)):
        load, part = heap[0]
        if load + sizes[i] > max_part_size:
            part, load = len(parts), 0
            parts.append([])
        else:
            heapq.heappop(heap)
        parts[part].append(i)
        heapq.heappush(heap, (load + sizes[i], part))
    filled = [sorted(p) for p in parts if p] + alone
    return sorted(filled, key=lambda p: p[0])


TIED_EMBEDDING = "model.embed_tokens.weight"
TIED_HEAD = "lm_head.weight"


def rank_plans(
    records: list[TensorRecord],
    spec: ShardSpec,
    config: ModelConfig,
    rules: RuleSet | None = None,
) -> list[TensorPlan]:
    """The tensors a saved directory holds for `spec.rank`: its plan without shared copies.

    In vLLM's layout a tied model's embedding is saved as `lm_head.weight`: vLLM's
    tied lm_head shares the embedding's storage, and its sharded_state loader keeps
    the smaller of two names for one storage, so that is the name it looks up.

    Raises:
        InvalidRequestError: the model cannot be split as asked.
    """
    plans = filter_shared(plan_shard(records, spec, config, rules))
    names = {p.name for p in plans}
    if spec.layout == "vllm" and config.tie_word_embeddings and TIED_EMBEDDING in names and TIED_HEAD not in names:
        plans = [replace(p, name=TIED_HEAD) if p.name == TIED_EMBEDDING else p for p in plans]
    return plans


@dataclass(frozen=True)
class ShardedStatePlan:
    """Every rank's part files, as plans: `parts[rank][part]` is that file's tensors in order."""

    model: str
    world_size: int
    layout: str
    max_part_size: int | None
    parts: tuple[tuple[tuple[TensorPlan, ...], ...], ...]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for rank in self.parts for part in rank for t in part)


def plan_sharded_state(
    records: list[TensorRecord],
    config: ModelConfig,
    *,
    model: str,
    world_size: int,
    layout: str = "checkpoint",
    max_part_size: int | None = None,
    rules: RuleSet | None = None,
) -> ShardedStatePlan:
    """Plan every rank of a saved directory before anything is written.

    Raises:
        InvalidRequestError: the model cannot be split as asked.
    """
    ranks = []
    for rank in range(world_size):
        spec = ShardSpec(model=model, rank=rank, world_size=world_size, layout=layout)
        plans = rank_plans(records, spec, config, rules)
        parts = balance_parts([p.nbytes for p in plans], max_part_size)
        ranks.append(tuple(tuple(plans[i] for i in part) for part in parts))
    return ShardedStatePlan(model, world_size, layout, max_part_size, tuple(ranks))
