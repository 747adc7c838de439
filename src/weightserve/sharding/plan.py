"""Tensor plans: each served tensor as pieces of its sources, and reading them.

A plan never holds tensor bytes. A piece is a run of rows in one source (one row for
a contiguous range; several, `stride` apart, for a slice along a later dim) or a run
of zeros (vocabulary padding), so any slice is served straight from the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from weightserve.errors import InvalidRequestError, PreconditionError
from weightserve.loaders.base import SavedShards, TensorRecord
from weightserve.loaders.sources import Source
from weightserve.sharding.model_config import ModelConfig
from weightserve.sharding.rules import RuleSet
from weightserve.sharding.spec import ShardSpec

if TYPE_CHECKING:
    from weightserve.sharding.experts import ExpertSlots

ZEROS = -1
"""Piece.source for bytes that are zero (padding), read from nowhere."""


@dataclass(frozen=True)
class Piece:
    """`rows` runs of `row_bytes` bytes, `stride` apart, from `offset` in source `source`."""

    source: int
    offset: int
    row_bytes: int
    rows: int = 1
    stride: int = 0

    @property
    def nbytes(self) -> int:
        return self.row_bytes * self.rows


@dataclass(frozen=True)
class TensorPlan:
    """One tensor as a rank receives it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


def whole_tensor(record: TensorRecord) -> TensorPlan:
    """The plan that serves a record unsliced."""
    pieces = (Piece(record.source, record.offset, record.nbytes),) if record.nbytes else ()
    return TensorPlan(record.name, record.dtype, record.shape, pieces)


def plan_shard(
    records: list[TensorRecord],
    spec: ShardSpec,
    config: ModelConfig | None = None,
    rules: RuleSet | None = None,
    saved: SavedShards | None = None,
    experts: ExpertSlots | None = None,
) -> list[TensorPlan]:
    """The tensors rank `spec` receives, in stream order (embeddings, layers, head).

    At world_size 1, pp_size 1 with the checkpoint layout the model is served exactly
    as saved; otherwise every tensor is placed by a rule (see rules.py). With
    expert parallelism (`spec.ep_size`), `experts` says which expert slots the rank
    holds: those experts come whole, everything else is TP-sliced; when `experts`
    sends only a delta, nothing else is sent.

    Raises:
        InvalidRequestError: the model cannot be split as asked.
    """
    # Imported here: these modules build on this module's types.
    from weightserve.sharding.experts import expert_plans, is_expert, moe_layout
    from weightserve.sharding.layouts import to_vllm
    from weightserve.sharding.slicing import slice_tensor
    from weightserve.sharding.stages import in_stage, stream_order

    config = config or ModelConfig()
    rules = rules or RuleSet()
    if saved is not None:
        return stream_order([whole_tensor(r) for r in _saved_rank(saved, spec)])
    expert_part: list[TensorPlan] = []
    if spec.ep_size:
        layout = moe_layout(records)
        if layout is None or experts is None:
            raise InvalidRequestError(f"model {spec.model!r} has no experts to spread over ep_size {spec.ep_size}")
        stage = {r.name for r in in_stage(records, spec, config)}
        expert_part = expert_plans([r for r in records if r.name in stage], layout, experts)
        if experts.delta_only:
            return stream_order(expert_part)
        records = [r for r in records if not is_expert(r.name)]
    elif spec.world_size == 1 and spec.pp_size == 1 and spec.layout == "checkpoint":
        return stream_order([whole_tensor(r) for r in records])
    selected = in_stage(records, spec, config)
    plans = [
        slice_tensor(r, rules.rule_for(r.name, config.model_type), config, spec.rank, spec.world_size) for r in selected
    ]
    plans += expert_part
    if spec.layout == "vllm":
        plans = to_vllm(plans)
    return stream_order(plans)


def _saved_rank(saved: SavedShards, spec: ShardSpec) -> tuple[TensorRecord, ...]:
    if spec.world_size != saved.world_size:
        raise PreconditionError(
            f"model {spec.model!r} is saved pre-sharded for world_size {saved.world_size}; "
            f"asked for world_size {spec.world_size}: serve the canonical checkpoint for other sizes"
        )
    if spec.layout != saved.layout or spec.pp_size != 1 or spec.ep_size:
        raise PreconditionError(
            f"model {spec.model!r} is saved pre-sharded with layout {saved.layout!r} and no pipeline "
            f"or expert parallelism; asked for layout {spec.layout!r}, pp_size {spec.pp_size}, "
            f"ep_size {spec.ep_size}"
        )
    return saved.records_by_rank[spec.rank]


def read_range(plan: TensorPlan, sources: list[Source], start: int, dest: memoryview) -> None:
    """Fill `dest` with bytes [start, start + len(dest)) of the served tensor."""
    want_end = start + len(dest)
    base = 0  # offset of the current piece within the tensor
    for piece in plan.pieces:
        lo, hi = max(start, base), min(want_end, base + piece.nbytes)
        if lo < hi:
            _read_piece(piece, sources, lo - base, dest[lo - start : hi - start])
        base += piece.nbytes
        if base >= want_end:
            break


def _read_piece(piece: Piece, sources: list[Source], at: int, dest: memoryview) -> None:
    if piece.source == ZEROS:
        dest[:] = bytes(len(dest))
        return
    source = sources[piece.source]
    if piece.rows == 1:
        source.read_into(piece.offset + at, dest)
        return
    # Gather row by row, so only the rank's bytes are read: a partial first row, whole
    # rows in one tight loop, a partial last row.
    row, col = divmod(at, piece.row_bytes)
    done = 0
    if col:
        done = min(piece.row_bytes - col, len(dest))
        source.read_into(piece.offset + row * piece.stride + col, dest[:done], check=False)
        row += 1
    whole = (len(dest) - done) // piece.row_bytes
    if whole:
        end = done + whole * piece.row_bytes
        source.read_rows(piece.offset + row * piece.stride, piece.row_bytes, piece.stride, dest[done:end])
        done, row = end, row + whole
    if done < len(dest):
        source.read_into(piece.offset + row * piece.stride, dest[done:], check=False)
    source.check_unchanged()
