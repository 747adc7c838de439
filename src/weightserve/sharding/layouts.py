"""Engine run-time layouts: the tensors vLLM's parallel layers hold, built from slices.

Fusing is concatenation of pieces along dim 0 of the fused tensor, so a fused tensor
is still streamed straight from the checkpoint's files, each part already sliced for
the rank: `qkv_proj` = [q; k; v], `gate_up_proj` = [gate; up], and MoE experts
stacked as `experts.w13_weight [E, 2I/tp, H]` (gate then up per expert) and
`experts.w2_weight [E, H, I/tp]`.
"""

from __future__ import annotations

import re
from collections import defaultdict

from weightserve.errors import InvalidRequestError
from weightserve.sharding.tensor_plan import TensorPlan

_QKV = re.compile(r"^(?P<prefix>.*\.)(?P<part>q|k|v)_proj\.(?P<kind>weight|bias)$")
_GATE_UP = re.compile(r"^(?P<prefix>.*\.)(?P<part>gate|up)_proj\.(?P<kind>weight|bias)$")
_EXPERT = re.compile(
    r"^(?P<prefix>.*\.experts\.)(?P<expert>\d+)\.(?P<part>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
_W13_PARTS = {"w1": 0, "gate_proj": 0, "w3": 1, "up_proj": 1}


def _fuse(name: str, parts: list[TensorPlan]) -> TensorPlan:
    """Concatenate plans along dim 0."""
    dtypes = {p.dtype for p in parts}
    if len(dtypes) != 1 or len({p.shape[1:] for p in parts}) != 1:
        raise InvalidRequestError(f"cannot fuse {[p.name for p in parts]} into {name!r}: dtypes or shapes differ")
    rows = sum(p.shape[0] for p in parts)
    pieces = tuple(piece for p in parts for piece in p.pieces)
    return TensorPlan(name, parts[0].dtype, (rows, *parts[0].shape[1:]), pieces)


def _stack(name: str, plans: list[TensorPlan]) -> TensorPlan:
    """Stack equally shaped plans along a new dim 0."""
    if len({(p.dtype, p.shape) for p in plans}) != 1:
        raise InvalidRequestError(f"cannot stack experts into {name!r}: dtypes or shapes differ")
    pieces = tuple(piece for p in plans for piece in p.pieces)
    return TensorPlan(name, plans[0].dtype, (len(plans), *plans[0].shape), pieces)


def to_vllm(plans: list[TensorPlan]) -> list[TensorPlan]:
    """Rename and fuse a rank's checkpoint-named slices into vLLM's run-time tensors.

    Each fused tensor takes the position of its first part; other tensors keep theirs.
    """
    groups: dict[str, dict[str, TensorPlan]] = defaultdict(dict)
    experts: dict[str, dict[int, dict[str, TensorPlan]]] = defaultdict(lambda: defaultdict(dict))
    placed: dict[str, int] = {}
    out: list[TensorPlan | str] = []
    for plan in plans:
        if match := _EXPERT.match(plan.name):
            key = match["prefix"]
            experts[key][int(match["expert"])][match["part"]] = plan
        elif (match := _QKV.match(plan.name)) or (match := _GATE_UP.match(plan.name)):
            fused = "qkv_proj" if match.re is _QKV else "gate_up_proj"
            key = f"{match['prefix']}{fused}.{match['kind']}"
            groups[key][match["part"]] = plan
        else:
            out.append(plan)
            continue
        if key not in placed:
            placed[key] = len(out)
            out.append(key)
    result: list[TensorPlan] = []
    for item in out:
        if isinstance(item, TensorPlan):
            result.append(item)
        elif item in groups:
            order = ("q", "k", "v") if item.split(".")[-2] == "qkv_proj" else ("gate", "up")
            missing = [part for part in order if part not in groups[item]]
            if missing:
                raise InvalidRequestError(f"cannot build {item!r}: no {missing} part in this plan")
            result.append(_fuse(item, [groups[item][part] for part in order]))
        else:
            result += _stack_experts(item, experts[item])
    return result


def _stack_experts(prefix: str, by_expert: dict[int, dict[str, TensorPlan]]) -> list[TensorPlan]:
    ids = sorted(by_expert)
    if ids != list(range(len(ids))):
        raise InvalidRequestError(f"experts under {prefix!r} are not numbered 0..{len(ids) - 1}")
    w13, w2 = [], []
    for expert in ids:
        parts = by_expert[expert]
        gate_up = sorted((p for p in parts if p in _W13_PARTS), key=_W13_PARTS.__getitem__)
        down = [p for p in parts if p not in _W13_PARTS]
        if len(gate_up) != 2 or len(down) != 1:
            raise InvalidRequestError(f"expert {prefix}{expert} lacks gate, up or down weights")
        w13.append(_fuse(f"{prefix}{expert}.w13", [parts[p] for p in gate_up]))
        w2.append(parts[down[0]])
    return [_stack(f"{prefix}w13_weight", w13), _stack(f"{prefix}w2_weight", w2)]
