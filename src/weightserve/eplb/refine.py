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


# Swap partners are looked for on this many of the least loaded GPUs.
_PARTNER_GPUS = 8


class _Layers:
    """Working state of the layers being refined; finished layers are dropped in batches."""

    def __init__(self, weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int, target: torch.Tensor) -> None:
        layers = phy2log.shape[0]
        counts = replica_counts(phy2log, weight.shape[1]).to(torch.float64)
        self.rows = torch.arange(layers)
        self.p2l = phy2log.clone()
        self.share = (weight / counts).gather(1, phy2log)
        self.load = self.share.view(layers, num_gpus, -1).sum(-1)
        self.target = target
        self.live = torch.ones(layers, dtype=torch.bool)

    def flush(self, out: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Write finished rows to `out` and keep only `keep` (all rows when None)."""
        out[self.rows] = self.p2l
        if keep is not None:
            for name in ("rows", "p2l", "share", "load", "target", "live"):
                setattr(self, name, getattr(self, name)[keep])


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
        max_rounds: cap on batched rounds (default 4 * num_physical).
    """
    weight = weight.to(torch.float64)
    layers, num_physical = phy2log.shape
    per_gpu = num_physical // num_gpus
    width = min(num_gpus - 1, _PARTNER_GPUS)
    out = phy2log.clone()
    if width < 1 or layers == 0:
        return out
    if target is None:
        target = torch.full((layers,), -1.0, dtype=torch.float64)
    state = _Layers(weight, phy2log, num_gpus, target.to(torch.float64))
    local = torch.arange(per_gpu)
    for _ in range(4 * num_physical if max_rounds is None else max_rounds):
        n = state.rows.numel()
        top, hot = state.load.max(dim=-1)
        state.live &= top > state.target
        a_slots = hot[:, None] * per_gpu + local  # [n, S]
        a_share = state.share.gather(1, a_slots)
        a_expert = state.p2l.gather(1, a_slots)
        # Partners come from the `width` least loaded GPUs (the hot one only on ties,
        # where no swap with it can help).
        light = state.load.topk(width, dim=-1, largest=False).indices  # [n, K]
        b_slots = (light[:, :, None] * per_gpu + local).view(n, -1)  # [n, K*S]
        b_share = state.share.gather(1, b_slots).view(n, 1, width, per_gpu)
        b_expert = state.p2l.gather(1, b_slots).view(n, 1, width, per_gpu)
        # Candidates are [n, S (slot on the hot GPU), K (light GPU), S (slot there)].
        moved = a_share[:, :, None, None] - b_share
        worst = top[:, None, None, None] - moved
        moved += state.load.gather(1, light)[:, None, :, None]
        torch.maximum(worst, moved, out=worst)
        limit = torch.where(state.live, top * (1 - _REL_EPS), -torch.inf)
        bad = worst >= limit[:, None, None, None]
        # Never stack a second replica of an expert on a GPU: a's expert must be new to
        # b's GPU and b's expert new to the hot GPU.
        bad |= (a_expert[:, :, None, None] == b_expert).any(dim=-1, keepdim=True)
        bad |= (b_expert.reshape(n, -1, 1) == a_expert[:, None, :]).any(dim=-1).view(n, 1, width, per_gpu)
        if preference is not None:
            worst /= top.clamp(min=1e-300)[:, None, None, None]
            worst += _cost(preference, state.rows, hot, a_expert, light, b_expert.view(n, -1), layers)
        best_key, best = worst.masked_fill_(bad, torch.inf).view(n, -1).min(dim=-1)
        state.live = best_key < torch.inf
        idx = state.live.nonzero().flatten()
        if idx.numel() == 0:
            break
        pick = best[idx]
        a = a_slots[idx, pick // (width * per_gpu)]
        b = b_slots[idx, pick % (width * per_gpu)]
        _apply(state, idx, a, b, hot[idx], b // per_gpu)
        if 2 * idx.numel() <= n:
            state.flush(out, keep=state.live)
    state.flush(out)
    return out


def _cost(
    pref: SwapPreference,
    rows: torch.Tensor,
    hot: torch.Tensor,
    a_expert: torch.Tensor,
    light: torch.Tensor,
    b_expert: torch.Tensor,
    layers: int,
) -> torch.Tensor:
    """[n, S, K, S] cost class of each candidate swap; added to keys below 1."""
    n, per_gpu = a_expert.shape
    width = light.shape[1]
    cost = torch.zeros(n, per_gpu, width, 1, dtype=torch.float64)
    if pref.held_before is not None:
        _, num_gpus, num_logical = pref.held_before.shape
        before = pref.held_before.view(-1)
        base = (rows * num_gpus)[:, None]
        on_b = ((base + light)[:, None, :] * num_logical + a_expert[:, :, None]).view(-1)
        on_hot = ((base + hot[:, None]) * num_logical + b_expert).view(-1)
        cost += 2.0 * (~before[on_b]).view(n, per_gpu, width, 1)
        cost = cost + 2.0 * (~before[on_hot]).view(n, 1, width, per_gpu)
    if pref.home_node is not None:
        home = pref.home_node.view(-1)
        num_logical = pref.home_node.shape[1]
        base = (rows * num_logical)[:, None]
        off_b = home[(base + a_expert).view(-1)].view(n, per_gpu, 1) != light[:, None, :] // pref.gpus_per_node
        off_hot = home[(base + b_expert).view(-1)].view(n, -1) != (hot // pref.gpus_per_node)[:, None]
        cost += off_b.view(n, per_gpu, width, 1)
        cost = cost + off_hot.view(n, 1, width, per_gpu)
    return cost


def _apply(
    state: _Layers, idx: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gpu_a: torch.Tensor, gpu_b: torch.Tensor
) -> None:
    """Swap slots a and b in rows idx, keeping shares and loads in step."""
    x, y = state.p2l[idx, a], state.p2l[idx, b]
    sx, sy = state.share[idx, a], state.share[idx, b]
    state.p2l[idx, a], state.p2l[idx, b] = y, x
    state.share[idx, a], state.share[idx, b] = sy, sx
    state.load[idx, gpu_a] -= sx - sy
    state.load[idx, gpu_b] += sx - sy
