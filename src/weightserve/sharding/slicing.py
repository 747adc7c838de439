"""A rank's slice of one tensor, as pieces of its file (no bytes are touched here).

A slice along dim d of a row-major tensor is, for each index of the dims before d,
one contiguous run: a dim-0 slice is a single byte range, a dim-1 slice is one run
per row, `stride` apart. Fused tensors take several runs per row, one per part.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from weightserve.errors import CorruptCheckpointError, InvalidRequestError
from weightserve.loaders.base import TensorRecord
from weightserve.loaders.pieces import ZEROS, Piece
from weightserve.sharding.model_config import ModelConfig
from weightserve.sharding.rules import Rule
from weightserve.sharding.tensor_plan import TensorPlan, whole_tensor
from weightserve.wire import DTYPE_SIZES

VOCAB_PADDING = 64
"""vLLM's VocabParallelEmbedding pads the vocabulary to a multiple of this."""

Ranges = list[tuple[int, int]]


def slice_ranges(record: TensorRecord, dim: int, ranges: Ranges) -> TensorPlan:
    """The tensor made of `ranges` (start, length) along `dim`, concatenated in order.

    Raises:
        CorruptCheckpointError: a range lies outside the tensor. Ranges come from config.json
            as well as from shapes, and a range past the tensor would read its neighbours.
    """
    shape = list(record.shape)
    if dim >= len(shape):
        raise InvalidRequestError(f"tensor {record.name!r} of shape {shape} has no dim {dim} to split")
    for start, length in ranges:
        if start < 0 or length < 0 or start + length > shape[dim]:
            raise CorruptCheckpointError(
                f"{record.name!r} has {shape[dim]} along dim {dim}; its slice [{start}, {start + length}) "
                "lies outside it: config.json and the tensor disagree"
            )
    inner = math.prod(shape[dim + 1 :]) * DTYPE_SIZES[record.dtype]
    if record.block_bytes and dim == len(shape) - 1:
        for start, length in ranges:
            if start % record.block_bytes or length % record.block_bytes:
                raise InvalidRequestError(
                    f"{record.quant} tensor {record.name!r}: bytes [{start}, {start + length}) of a row cut a "
                    f"{record.block_bytes}-byte quantization block; choose a world_size that divides its blocks"
                )
    outer = math.prod(shape[:dim])
    stride = shape[dim] * inner
    pieces: list[Piece] = []
    if len(ranges) == 1 and outer > 1:
        start, length = ranges[0]
        pieces.append(Piece(record.source, record.offset + start * inner, length * inner, outer, stride))
    else:
        for row in range(outer):
            for start, length in ranges:
                pieces.append(Piece(record.source, record.offset + row * stride + start * inner, length * inner))
    shape[dim] = sum(length for _, length in ranges)
    return TensorPlan(record.name, record.dtype, tuple(shape), tuple(_merge(p for p in pieces if p.nbytes)))


def _merge(pieces: Iterable[Piece]) -> list[Piece]:
    """Join runs that touch end to start (a full-width slice becomes one range)."""
    merged: list[Piece] = []
    for original in pieces:
        piece = original
        if piece.rows > 1 and piece.row_bytes == piece.stride:
            piece = Piece(piece.source, piece.offset, piece.nbytes)
        last = merged[-1] if merged else None
        if (
            last is not None
            and last.rows == 1
            and piece.rows == 1
            and last.source == piece.source
            and last.offset + last.row_bytes == piece.offset
        ):
            merged[-1] = Piece(last.source, last.offset, last.row_bytes + piece.row_bytes)
        else:
            merged.append(piece)
    return merged


def even_range(size: int, rank: int, world_size: int, what: str) -> tuple[int, int]:
    """Rank's (start, length) of `size` split evenly; INVALID_ARGUMENT when it does not divide."""
    if size % world_size:
        raise InvalidRequestError(f"{what} ({size}) is not divisible by world_size {world_size}")
    part = size // world_size
    return rank * part, part


def kv_range(config: ModelConfig, rank: int, world_size: int, name: str) -> tuple[int, int]:
    """The k/v rows a rank holds: its share of the heads, or the one head it replicates."""
    heads, head_dim = config.num_key_value_heads, config.head_dim
    if not heads:
        raise CorruptCheckpointError(f"config.json: num_key_value_heads is 0, so {name!r} cannot be split by heads")
    if world_size <= heads:
        start, count = even_range(heads, rank, world_size, f"num_key_value_heads of {name!r}")
        return start * head_dim, count * head_dim
    if world_size % heads:
        raise InvalidRequestError(f"num_key_value_heads {heads} and world_size {world_size}: neither divides the other")
    head = rank // (world_size // heads)
    return head * head_dim, head_dim


def _check_attention(config: ModelConfig, world_size: int, name: str) -> None:
    if not config.num_attention_heads or not config.head_dim:
        raise InvalidRequestError(f"config.json gives no head counts, so {name!r} cannot be split by heads")
    if config.num_attention_heads % world_size:
        raise InvalidRequestError(
            f"num_attention_heads {config.num_attention_heads} is not divisible by world_size {world_size}"
        )


def _vocab(record: TensorRecord, config: ModelConfig, rank: int, world_size: int) -> TensorPlan:
    rows = record.shape[0]
    padded = -(-rows // VOCAB_PADDING) * VOCAB_PADDING
    start, count = even_range(padded, rank, world_size, f"padded vocabulary of {record.name!r}")
    data_rows = max(0, min(start + count, rows) - start)
    plan = slice_ranges(record, 0, [(start, data_rows)]) if data_rows else None
    row_bytes = math.prod(record.shape[1:]) * DTYPE_SIZES[record.dtype]
    pieces = list(plan.pieces) if plan else []
    if count > data_rows:
        pieces.append(Piece(ZEROS, 0, (count - data_rows) * row_bytes))
    return TensorPlan(record.name, record.dtype, (count, *record.shape[1:]), tuple(pieces))


def _check_rows(record: TensorRecord, heads: int, head_dim: int, fields: str) -> None:
    """The tensor has the rows config.json's head counts say, or slicing by heads would cut
    across them (or, for k/v, past the tensor into its neighbours)."""
    rows = record.shape[0] if record.shape else 0
    if rows != heads * head_dim:
        raise CorruptCheckpointError(
            f"{record.name!r} has {rows} rows, but config.json's {fields} ({heads} x {head_dim}) make "
            f"{heads * head_dim}: the checkpoint and its config disagree"
        )


def _q(record: TensorRecord, config: ModelConfig, rank: int, world_size: int) -> TensorPlan:
    _check_attention(config, world_size, record.name)
    heads = config.num_attention_heads
    if not record.shape or record.shape[0] % heads:  # rows of whole heads (a gated q has 2 x head_dim each)
        rows = record.shape[0] if record.shape else 0
        raise CorruptCheckpointError(
            f"{record.name!r} has {rows} rows, not a multiple of config.json's num_attention_heads {heads}"
        )
    return slice_ranges(record, 0, [even_range(record.shape[0], rank, world_size, f"rows of {record.name!r}")])


def _kv(record: TensorRecord, config: ModelConfig, rank: int, world_size: int) -> TensorPlan:
    _check_attention(config, world_size, record.name)
    _check_rows(record, config.num_key_value_heads, config.head_dim, "num_key_value_heads x head_dim")
    return slice_ranges(record, 0, [kv_range(config, rank, world_size, record.name)])


def _qkv(record: TensorRecord, config: ModelConfig, rank: int, world_size: int) -> TensorPlan:
    _check_attention(config, world_size, record.name)
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    if record.shape[0] != q_rows + 2 * kv_rows:
        raise InvalidRequestError(
            f"fused {record.name!r} has {record.shape[0]} rows; config.json implies {q_rows} + 2 x {kv_rows}"
        )
    q_start, q_len = even_range(q_rows, rank, world_size, "num_attention_heads x head_dim")
    kv_start, kv_len = kv_range(config, rank, world_size, record.name)
    ranges = [(q_start, q_len), (q_rows + kv_start, kv_len), (q_rows + kv_rows + kv_start, kv_len)]
    return slice_ranges(record, 0, ranges)


def _halves(record: TensorRecord, dim: int, rank: int, world_size: int) -> TensorPlan:
    half = record.shape[dim] // 2
    start, length = even_range(half, rank, world_size, f"each half of {record.name!r} along dim {dim}")
    return slice_ranges(record, dim, [(start, length), (half + start, length)])


def slice_tensor(record: TensorRecord, rule: Rule, config: ModelConfig, rank: int, world_size: int) -> TensorPlan:
    """Rank `rank`'s piece of `record` under `rule`.

    Raises:
        InvalidRequestError: the split is impossible (the message names the numbers).
    """
    if rule.kind == "replicated" or (world_size == 1 and rule.kind != "vocab"):
        return whole_tensor(record)
    if rule.kind == "dim":
        size = record.shape[rule.dim] if rule.dim < len(record.shape) else 0
        what = f"dim {rule.dim} of {record.name!r}"
        return slice_ranges(record, rule.dim, [even_range(size, rank, world_size, what)])
    if rule.kind == "halves":
        return _halves(record, rule.dim, rank, world_size)
    by_kind: dict[str, Callable[[TensorRecord, ModelConfig, int, int], TensorPlan]] = {
        "vocab": _vocab,
        "q": _q,
        "kv": _kv,
        "qkv": _qkv,
    }
    return by_kind[rule.kind](record, config, rank, world_size)
