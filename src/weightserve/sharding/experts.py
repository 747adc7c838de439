"""Expert parallelism: which expert weights an EP rank holds, named by local slot.

An EP rank g holds physical slots [g*S, (g+1)*S) of every MoE layer; each slot holds
one logical expert (two slots may hold the same one). The rank receives those
experts whole (not TP-sliced, as vLLM does under expert parallelism), each tensor
named with the local slot index where the checkpoint has the expert id:

    model.layers.3.block_sparse_moe.experts.7.w1.weight    (checkpoint, expert 7)
    model.layers.3.block_sparse_moe.experts.0.w1.weight    (served as local slot 0)

Fused checkpoints (`experts.w13_weight [E, 2I, H]`) are served per slot as
`experts.{slot}.w13_weight [2I, H]`. Everything else is TP-sliced as usual.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from weightserve.errors import CorruptCheckpointError, InvalidRequestError
from weightserve.loaders.base import TensorRecord
from weightserve.sharding.slicing import slice_ranges
from weightserve.sharding.tensor_plan import TensorPlan

PER_EXPERT = re.compile(r"^(?P<prefix>.*?\blayers\.(?P<layer>\d+)\..*?\bexperts\.)(?P<expert>\d+)\.(?P<rest>.+)$")
FUSED = re.compile(r"^(?P<prefix>.*?\blayers\.(?P<layer>\d+)\..*?\bexperts\.)(?P<rest>w13_weight|w2_weight)$")


@dataclass(frozen=True)
class MoeLayout:
    """The MoE layers of a checkpoint: decoder layer indices in order, experts per layer."""

    layers: tuple[int, ...]
    num_experts: int

    def moe_index(self, layer: int) -> int:
        return self.layers.index(layer)


def moe_layout(records: Sequence[TensorRecord], expected: int = 0) -> MoeLayout | None:
    """Find the expert tensors; None for a dense model.

    Expert ids are positions in the router's output, so a layer must hold experts
    0..E-1 with the same weights each, and E must be config.json's count (`expected`,
    0: none given); numbering the experts found instead would serve expert 4 as 3.

    Raises:
        InvalidRequestError: layers disagree on the number of experts.
        CorruptCheckpointError: a layer lacks an expert, or an expert lacks a weight the
            others have, or the count is not config.json's.
    """
    experts: dict[int, set[int]] = {}
    parts: dict[tuple[int, int], set[str]] = {}
    for record in records:
        if match := PER_EXPERT.match(record.name):
            layer, expert = int(match["layer"]), int(match["expert"])
            experts.setdefault(layer, set()).add(expert)
            parts.setdefault((layer, expert), set()).add(match["rest"])
        elif (match := FUSED.match(record.name)) and record.shape:
            experts.setdefault(int(match["layer"]), set()).update(range(record.shape[0]))
    if not experts:
        return None
    counts = {len(ids) for ids in experts.values()}
    if len(counts) != 1:
        raise InvalidRequestError(f"MoE layers disagree on the number of experts: {sorted(counts)}")
    count = counts.pop()
    for layer, ids in sorted(experts.items()):
        _check_experts(layer, ids, count, expected, parts)
    return MoeLayout(tuple(sorted(experts)), count)


def _check_experts(
    layer: int, ids: set[int], count: int, expected: int, parts: dict[tuple[int, int], set[str]]
) -> None:
    """Layer `layer` holds experts 0..count-1, config.json's count of them, each with the same weights."""
    missing = sorted(set(range(count)) - ids)
    if missing:
        raise CorruptCheckpointError(
            f"MoE layer {layer} holds {count} experts numbered up to {max(ids)}: it lacks expert(s) {missing[:8]}"
        )
    if expected and count != expected:
        raise CorruptCheckpointError(f"MoE layer {layer} holds {count} experts; config.json says {expected}")
    weights = [parts[(layer, e)] for e in sorted(ids) if (layer, e) in parts]
    if weights and any(w != weights[0] for w in weights):
        odd = next(e for e in sorted(ids) if parts.get((layer, e)) != weights[0])
        raise CorruptCheckpointError(
            f"MoE layer {layer}: expert {odd} has weights {sorted(parts.get((layer, odd), set()))}, "
            f"expert 0 has {sorted(weights[0])}"
        )


def is_expert(name: str) -> bool:
    return bool(PER_EXPERT.match(name) or FUSED.match(name))


@dataclass(frozen=True)
class ExpertSlots:
    """The slots one EP rank holds under one mapping version, per MoE layer."""

    version: int
    layers: tuple[int, ...]
    physical: tuple[tuple[int, ...], ...]
    logical: tuple[tuple[int, ...], ...]
    send: tuple[tuple[int, ...], ...]
    """Local slots whose weights are sent: all of them, or the delta since a version."""
    delta_only: bool = False
    """True for a delta (since a mapping version): only those experts, no other tensors."""

    def fingerprint(self) -> str:
        """A digest of what the slots hold and send: part of the manifest id, so two placements
        (even under one version number) never share a manifest or its cached chunks."""
        blob = repr((self.layers, self.physical, self.logical, self.send, self.delta_only)).encode()
        return hashlib.sha256(blob).hexdigest()[:32]


def expert_plans(records: Sequence[TensorRecord], layout: MoeLayout, slots: ExpertSlots) -> list[TensorPlan]:
    """Whole-expert plans for the slots to send, named by local slot."""
    by_layer_expert: dict[tuple[int, int], list[TensorRecord]] = {}
    fused: dict[int, list[TensorRecord]] = {}
    for record in records:
        if match := PER_EXPERT.match(record.name):
            by_layer_expert.setdefault((int(match["layer"]), int(match["expert"])), []).append(record)
        elif match := FUSED.match(record.name):
            fused.setdefault(int(match["layer"]), []).append(record)
    plans: list[TensorPlan] = []
    for moe, layer in enumerate(layout.layers):
        for slot in slots.send[moe]:
            expert = slots.logical[moe][slot]
            for record in by_layer_expert.get((layer, expert), []):
                match = PER_EXPERT.match(record.name)
                assert match is not None
                plan = slice_ranges(record, 0, [(0, record.shape[0])]) if record.shape else None
                name = f"{match['prefix']}{slot}.{match['rest']}"
                pieces = plan.pieces if plan else ()
                plans.append(TensorPlan(name, record.dtype, record.shape, pieces))
            for record in fused.get(layer, []):
                match = FUSED.match(record.name)
                assert match is not None
                one = slice_ranges(record, 0, [(expert, 1)])
                plans.append(
                    TensorPlan(f"{match['prefix']}{slot}.{match['rest']}", one.dtype, one.shape[1:], one.pieces)
                )
    return plans
