"""The improvement pass: swap replicas off each layer's most loaded GPU while it helps.

A replica's load is its expert's tokens split evenly over the expert's replicas, so a
swap of two slots changes exactly two GPU loads and no replica count. Each round, for
every layer still improving, the pass looks at all swaps between a slot on the most
loaded GPU m and any slot b on another GPU h, and applies the one whose larger
resulting load, max(load_m - d, load_h + d), is smallest, provided it is below load_m.
So the layer's top load never rises and every applied swap lowers the load of the
sorted load vector lexicographically: the pass terminates, and a caller's placement
can only get better (`balancedness` is monotone). All layers advance in one batched
tensor step per round; a layer drops out when no swap helps or it reaches its target.

Swaps that would put a second replica of an expert on a GPU that already holds it
are never taken (they waste a slot). A SwapPreference ranks the improving swaps by
cost classes before load: placements the GPU did not hold before (moves) and
placements off an expert group's home node.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weightserve.eplb.mapping import replica_counts

_REL_EPS = 1e-9


@dataclass(frozen=True, eq=False)
class SwapPreference:
    """Cost classes for choosing among improving swaps (lower class wins first).

    Attributes:
        held_before: [layers, gpus, logical] bool, what each GPU held in the mapping in
            force; a swap costs 2 per replica it puts on a GPU that did not hold it.
        home_node: [layers, logical] int64, the node an expert's group lives on; a
            swap costs 1 per replica it puts off that node.
        gpus_per_node: GPUs per node, to find a GPU's node.
    """

    held_before: torch.Tensor | None = None
    home_node: torch.Tensor | None = None
    gpus_per_node: int = 1


def gpu_loads(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """[layers, num_gpus] float64: tokens each GPU serves when replicas split evenly."""
    counts = replica_counts(phy2log, weight.shape[1]).to(torch.float64)
    share = (weight.to(torch.float64) / counts).gather(1, phy2log)
    return share.view(phy2log.shape[0], num_gpus, -1).sum(-1)


# ATen splits an elementwise op over threads from 32768 elements up; on a small, busy
# host that costs far more than it saves, so the pass works on chunks of layers whose
# candidate tensors stay below it.
_CHUNK_ELEMENTS = 32768
# Swap partners are looked for on this many of the least loaded GPUs.
_PARTNER_GPUS = 8


class _Layers:
    """Working state of the layers still being refined, compacted as layers finish."""

    def __init__(self, weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int, target: torch.Tensor) -> None:
        layers, num_physical = phy2log.shape
        num_logical = weight.shape[1]
        self.rows = torch.arange(layers)
        self.p2l = phy2log.clone()
        counts = replica_counts(phy2log, num_logical).to(torch.float64)
        self.share = (weight / counts).gather(1, phy2log)
        self.load = self.share.view(layers, num_gpus, -1).sum(-1)
        gpu = torch.arange(num_physical) // (num_physical // num_gpus)
        held = torch.zeros(layers, num_gpus * num_logical, dtype=torch.int32)
        self.held = held.scatter_add_(1, gpu * num_logical + phy2log, torch.ones_like(phy2log, dtype=torch.int32))
        self.target = target.clone()

    def keep(self, mask: torch.Tensor) -> None:
        for name in ("rows", "p2l", "share", "load", "held", "target"):
            setattr(self, name, getattr(self, name)[mask])


def refine_swaps(
    weight: torch.Tensor,
    phy2log: torch.Tensor,
    num_gpus: int,
    *,
    target: torch.Tensor | None = None,
    preference: SwapPreference | None = None,
    max_rounds: int | None = None,
) -> torch.Tensor:
    """Improve a placement by swapping slots; returns a new phy2log (input untouched).

    Args:
        weight: [layers, num_logical] token counts.
        phy2log: [layers, num_physical] starting placement.
        num_gpus: GPUs; slots divide evenly over them.
        target: [layers] optional; a layer stops once its top GPU load is <= target.
        preference: optional cost classes for choosing among improving swaps.
        max_rounds: cap on batched rounds per chunk of layers (default 4 * num_physical).
    """
    weight = weight.to(torch.float64)
    layers, num_physical = phy2log.shape
    if target is None:
        target = torch.full((layers,), -1.0, dtype=torch.float64)
    target = target.to(torch.float64)
    rounds = 4 * num_physical if max_rounds is None else max_rounds
    out = phy2log.clone()
    per_gpu = num_physical // num_gpus
    chunk = max(1, _CHUNK_ELEMENTS // (per_gpu * per_gpu * min(num_gpus, _PARTNER_GPUS)))
    for lo in range(0, layers, chunk):
        part = slice(lo, min(layers, lo + chunk))
        pref = preference and SwapPreference(
            held_before=None if preference.held_before is None else preference.held_before[part],
            home_node=None if preference.home_node is None else preference.home_node[part],
            gpus_per_node=preference.gpus_per_node,
        )
        out[part] = _refine_chunk(weight[part], phy2log[part], num_gpus, target[part], pref, rounds)
    return out


def _refine_chunk(
    weight: torch.Tensor,
    phy2log: torch.Tensor,
    num_gpus: int,
    target: torch.Tensor,
    preference: SwapPreference | None,
    rounds: int,
) -> torch.Tensor:
    num_physical = phy2log.shape[1]
    num_logical = weight.shape[1]
    per_gpu = num_physical // num_gpus
    out = phy2log.clone()
    state = _Layers(weight, phy2log, num_gpus, target)
    local = torch.arange(per_gpu)
    width = min(num_gpus - 1, _PARTNER_GPUS)
    if width < 1:
        return out
    for _ in range(rounds):
        top, hot = state.load.max(dim=-1)
        live = top > state.target
        if not bool(live.all()):
            out[state.rows[~live]] = state.p2l[~live]
            state.keep(live)
            top, hot = top[live], hot[live]
        n = state.rows.numel()
        if n == 0:
            break
        a_slots = hot[:, None] * per_gpu + local  # [n, S]
        a_share = state.share.gather(1, a_slots)
        a_expert = state.p2l.gather(1, a_slots)
        # Partners come from the `width` least loaded GPUs (never the hot one).
        light = state.load.topk(width, dim=-1, largest=False).indices  # [n, K]
        b_slots = (light[:, :, None] * per_gpu + local).view(n, -1)  # [n, K*S]
        b_share = state.share.gather(1, b_slots).view(n, 1, width, per_gpu)
        b_expert = state.p2l.gather(1, b_slots)
        # Candidates are [n, S (slot on the hot GPU), K (light GPU), S (slot there)].
        moved = a_share[:, :, None, None] - b_share
        worst = top[:, None, None, None] - moved
        torch.maximum(worst, moved.add_(state.load.gather(1, light)[:, None, :, None]), out=worst)
        # Never stack a second replica of an expert on a GPU: a's expert must be new to
        # b's GPU and b's expert new to the hot GPU.
        flat = state.held
        fresh_b = flat.gather(1, (light[:, None, :] * num_logical + a_expert[:, :, None]).view(n, -1)) == 0
        fresh_a = flat.gather(1, hot[:, None] * num_logical + b_expert) == 0
        ok = fresh_b.view(n, per_gpu, width, 1) & fresh_a.view(n, 1, width, per_gpu)
        ok &= worst < (top * (1 - _REL_EPS))[:, None, None, None]
        if preference is not None:
            worst /= top.clamp(min=1e-300)[:, None, None, None]
            worst += _cost(preference, state.rows, hot, a_expert, light, b_expert, num_logical)
        best_key, best = worst.masked_fill_(~ok, torch.inf).view(n, -1).min(dim=-1)
        go = torch.isfinite(best_key)
        if not bool(go.any()):
            break
        idx = go.nonzero().flatten()
        pick = best[idx]
        a = a_slots[idx, pick // (width * per_gpu)]
        b = b_slots[idx, pick % (width * per_gpu)]
        _apply(state, idx, a, b, hot[idx], b // per_gpu, num_logical)
        if not bool(go.all()):
            out[state.rows[~go]] = state.p2l[~go]
            state.keep(go)
    out[state.rows] = state.p2l
    return out


def _cost(
    pref: SwapPreference,
    rows: torch.Tensor,
    hot: torch.Tensor,
    a_expert: torch.Tensor,
    light: torch.Tensor,
    b_expert: torch.Tensor,
    num_logical: int,
) -> torch.Tensor:
    """[n, S, K, S] cost class of each candidate swap; added to keys below 1."""
    n, per_gpu = a_expert.shape
    width = light.shape[1]
    cost = torch.zeros(n, per_gpu, width, 1, dtype=torch.float64)
    if pref.held_before is not None:
        before = pref.held_before[rows].view(n, -1)
        new_on_b = ~before.gather(1, (light[:, None, :] * num_logical + a_expert[:, :, None]).view(n, -1))
        new_on_hot = ~before.gather(1, hot[:, None] * num_logical + b_expert)
        cost += 2.0 * new_on_b.view(n, per_gpu, width, 1)
        cost = cost + 2.0 * new_on_hot.view(n, 1, width, per_gpu)
    if pref.home_node is not None:
        home = pref.home_node[rows]
        off_b = home.gather(1, a_expert)[:, :, None] != light // pref.gpus_per_node
        off_hot = home.gather(1, b_expert) != (hot // pref.gpus_per_node)[:, None]
        cost += off_b.view(n, per_gpu, width, 1)
        cost = cost + off_hot.view(n, 1, width, per_gpu)
    return cost


def _apply(
    state: _Layers,
    idx: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    gpu_a: torch.Tensor,
    gpu_b: torch.Tensor,
    num_logical: int,
) -> None:
    """Swap slots a and b in rows idx, keeping shares, loads and held counts in step."""
    x, y = state.p2l[idx, a], state.p2l[idx, b]
    sx, sy = state.share[idx, a], state.share[idx, b]
    state.p2l[idx, a], state.p2l[idx, b] = y, x
    state.share[idx, a], state.share[idx, b] = sy, sx
    state.load[idx, gpu_a] -= sx - sy
    state.load[idx, gpu_b] += sx - sy
    one = torch.ones_like(x, dtype=torch.int32)
    state.held[idx, gpu_a * num_logical + x] -= one
    state.held[idx, gpu_a * num_logical + y] += one
    state.held[idx, gpu_b * num_logical + y] -= one
    state.held[idx, gpu_b * num_logical + x] += one
