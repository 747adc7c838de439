"""Pipeline-parallel stages and stream order.

Which decoder layers each stage runs (as vLLM's get_pp_indices splits them), which
tensors a stage needs, and the order a rank's tensors are streamed in (embeddings,
then layer 0, 1, ..., then the head) so a worker can build layers early.
"""

from __future__ import annotations

import re
from typing import TypeVar

from weightserve.errors import InvalidRequestError
from weightserve.loaders.base import TensorRecord
from weightserve.sharding.model_config import ModelConfig
from weightserve.sharding.spec import ShardSpec
from weightserve.sharding.tensor_plan import TensorPlan

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


_EMBED = re.compile(r"(?:^|\.)embed_tokens\.")
_HEAD = re.compile(r"(?:^|\.)lm_head\.|^model\.norm\.|^norm\.")

T = TypeVar("T", TensorRecord, TensorPlan)


def _group(name: str) -> int:
    """0 for embeddings, 1 for decoder layers (and anything else), 2 for the head."""
    if _EMBED.search(name):
        return 0
    if _HEAD.search(name):
        return 2
    return 1


def in_stage(records: list[TensorRecord], spec: ShardSpec, config: ModelConfig) -> list[TensorRecord]:
    """Records pipeline stage `spec.pp_rank` needs: its layers, embeddings first, head last.

    With tied embeddings and no lm_head tensor the last stage also gets the embedding,
    which its lm_head reuses.
    """
    if spec.pp_size == 1:
        return records
    layers = [i for r in records if (i := layer_of(r.name)) is not None]
    num_layers = max(layers) + 1 if layers else config.num_hidden_layers
    if spec.pp_size > num_layers:
        raise InvalidRequestError(
            f"pp_size {spec.pp_size} exceeds the model's {num_layers} decoder layers: a stage needs at least one"
        )
    mine = stage_layers(num_layers, spec.pp_rank, spec.pp_size)
    first, last = spec.pp_rank == 0, spec.pp_rank == spec.pp_size - 1
    has_head = any(_HEAD.search(r.name) and "lm_head" in r.name for r in records)
    kept = []
    for record in records:
        layer = layer_of(record.name)
        group = _group(record.name)
        if layer is not None:
            keep = layer in mine
        elif group == 0:
            keep = first or (last and config.tie_word_embeddings and not has_head)
        elif group == 2:
            keep = last
        else:
            keep = True
        if keep:
            kept.append(record)
    return kept


def stream_order(items: list[T]) -> list[T]:
    """Embeddings, then layer 0, 1, ..., then the head, so a worker can build layers early."""
    keyed = []
    for position, item in enumerate(items):
        layer = layer_of(item.name)
        keyed.append(((_group(item.name), -1 if layer is None else layer, position), item))
    return [item for _, item in sorted(keyed, key=lambda pair: pair[0])]
