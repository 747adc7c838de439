"""The improvement pass: swap replicas off the most loaded GPUs while it helps.

A replica's load is its expert's tokens split evenly over the expert's replicas, so a
swap of two slots changes exactly two GPU loads and no replica count. Each round, for
every layer still improving, each of the few most loaded GPUs m looks at the swaps of
one of its slots a with a slot b on one of the least loaded GPUs h, and takes the one
whose larger resulting load, max(load_m - d, load_h + d) with d = share_a - share_b,
is smallest, provided it is below load_m; the hottest GPU chooses first and no GPU takes
part in two swaps of a round. Every applied swap replaces two loads by two smaller than
the larger of them, so the sorted load vector falls lexicographically: a layer's top
load never rises and the pass terminates. When the hottest GPU finds no swap, a slot
rewrite (`recount_step`) may change a replica count instead. All layers advance in one
batched tensor step per round; a layer drops out when nothing helps or it has reached
its target.

A swap never puts an expert on a GPU that already holds it (two replicas on one GPU
serve no more tokens than one). A SwapPreference ranks the improving swaps by cost
class before load: replicas put on a GPU that did not hold them before (moves), then
replicas put off their group's home node. Candidates are ranked in float32, the bulk of
the work; each chosen swap is re-checked in float64 before it is applied.
"""

from __future__ import annotations

import torch

from weightserve.eplb.refine.recount import recount_step
from weightserve.eplb.refine.state import RefineState, SwapPreference

_REL_EPS = 1e-9
# Each round, this many of the most loaded GPUs look for a partner among this many of
# the least loaded.
_HOT_GPUS = 4
_PARTNER_GPUS = 8


def refine_swaps(
    weight: torch.Tensor,
    phy2log: torch.Tensor,
    num_gpus: int,
    *,
    target: torch.Tensor | None = None,
    preference: SwapPreference | None = None,
    recount: bool = True,
    max_rounds: int | None = None,
) -> torch.Tensor:
    """Improve a placement by swapping slots; returns a new phy2log (input untouched).

    Args:
        weight: [layers, num_logical] token counts.
        phy2log: [layers, num_physical] starting placement.
        num_gpus: GPUs; slots divide evenly over them.
        target: [layers] optional; a layer stops once its top GPU load is <= target.
        preference: optional cost classes for choosing among improving swaps.
        recount: also rewrite slots to change replica counts when no swap helps.
        max_rounds: cap on batched rounds (default 4 * num_physical).
    """
    weight = weight.to(torch.float64)
    layers, num_physical = phy2log.shape
    out = phy2log.clone()
    width = min(num_gpus - 1, _PARTNER_GPUS)
    if width < 1 or layers == 0:
        return out
    hot_gpus = max(1, min(_HOT_GPUS, num_gpus - width))
    if target is None:
        target = torch.full((layers,), -1.0, dtype=torch.float64)
    state = RefineState(weight, phy2log, num_gpus, target.to(torch.float64))
    for _ in range(4 * num_physical if max_rounds is None else max_rounds):
        order = state.load.argsort(dim=1, descending=True)
        top = state.load.gather(1, order[:, :1]).squeeze(1)
        state.live &= top > state.target
        swapping = state.live & ~state.waiting
        first = _swap_round(state, order[:, :hot_gpus], order[:, num_gpus - width :], swapping, preference)
        state.waiting |= swapping & ~first
        # A layer whose hottest GPU found no swap waits for a slot rewrite; rewrites run
        # in batches, when half the live layers wait or no layer swapped.
        waiting = state.waiting.nonzero().flatten()
        if waiting.numel() and (2 * waiting.numel() >= int(state.live.sum()) or not bool(first.any())):
            if recount:
                limit = top[waiting] * (1 - _REL_EPS)
                state.live[waiting] = recount_step(state, waiting, order[waiting, 0], limit, preference)
            else:
                state.live[waiting] = False
            state.waiting[waiting] = False
        live = int(state.live.sum())
        if live == 0:
            break
        if 2 * live <= state.rows.numel():
            state.flush(out, keep=state.live)
    state.flush(out)
    return out


def _swap_round(
    state: RefineState,
    hot: torch.Tensor,
    light: torch.Tensor,
    active: torch.Tensor,
    preference: SwapPreference | None,
) -> torch.Tensor:
    """Apply the best improving swap of each hot GPU; [n] bool, whether the hottest swapped.

    Args:
        hot: [n, T] the most loaded GPUs, hottest first.
        light: [n, K] the least loaded GPUs (disjoint from `hot`).
        active: [n] rows that may swap.
    """
    n, num_physical = state.p2l.shape
    per_gpu = num_physical // state.num_gpus
    count, width, logical = hot.shape[1], light.shape[1], state.num_logical
    local = torch.arange(per_gpu)
    a_slots = (hot.unsqueeze(2) * per_gpu + local).view(n, -1)  # [n, T*S]
    b_slots = (light.unsqueeze(2) * per_gpu + local).view(n, -1)  # [n, K*S]
    a_share, b_share = state.share.gather(1, a_slots), state.share.gather(1, b_slots)
    a_expert, b_expert = state.p2l.gather(1, a_slots), state.p2l.gather(1, b_slots)
    hot_load, light_load = state.load.gather(1, hot), state.load.gather(1, light)
    # A swap must not put an expert on a GPU that already holds it: such a move's
    # load is +inf.
    base = (state.rows * state.num_gpus).view(n, 1, 1)
    on_light = state.count_at((base + light.unsqueeze(1)) * logical + a_expert.unsqueeze(2)) > 0  # [n, T*S, K]
    on_hot = state.count_at((base + hot.unsqueeze(2)) * logical + b_expert.unsqueeze(1)) > 0  # [n, T, K*S]
    # Candidates are [n, T (hot GPU), K (light GPU), S (slot on the hot GPU), S (slot on
    # the light one)].
    a32, b32, hot32 = a_share.float(), b_share.float(), hot_load.float()
    lift = (a32.unsqueeze(2) + light_load.float().unsqueeze(1)).masked_fill_(on_light, torch.inf)  # [n, T*S, K]
    lift = lift.view(n, count, per_gpu, width).transpose(2, 3).unsqueeze(4)
    keep = b32.unsqueeze(1).masked_fill(on_hot, -torch.inf).view(n, count, width, 1, per_gpu)
    worst = (hot32.unsqueeze(2) - a32.view(n, count, per_gpu)).view(n, count, 1, per_gpu, 1)
    worst = worst + b32.view(n, 1, width, 1, per_gpu)
    torch.maximum(worst, lift - keep, out=worst)
    limit = torch.where(active.unsqueeze(1), hot_load * (1 - _REL_EPS), -torch.inf)  # [n, T]
    limit32 = limit.float()
    if preference is not None:
        cost = _cost(preference, state.rows, hot, a_expert.view(n, count, per_gpu), light, b_expert, hot32[:, :1])
        worst = torch.where(worst < limit32.view(n, count, 1, 1, 1), worst + cost, torch.inf)
        limit32 = torch.full_like(limit32, torch.inf)
    # Best pair of slots per (hot GPU, light GPU), then partners hottest first.
    pair_key, pair = worst.view(n, count, width, -1).min(dim=-1)
    found, partner = _pick(pair_key, limit32)
    within = pair.gather(2, partner.unsqueeze(2)).squeeze(2)
    a = hot * per_gpu + within // per_gpu
    b = light.gather(1, partner) * per_gpu + within % per_gpu
    # float64 check: both new loads below the hot GPU's limit.
    moved = state.share.gather(1, a) - state.share.gather(1, b)
    found &= torch.maximum(hot_load - moved, light_load.gather(1, partner) + moved) < limit
    # Hot GPUs without a swap swap a slot with itself, so one batched update serves all.
    _apply(state, a, torch.where(found, b, a), per_gpu)
    return found[:, 0]


def _pick(keys: torch.Tensor, limit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hottest GPU first, each takes its lowest key among the partners still free.

    Args:
        keys: [n, T, K] best key of each (hot GPU, light GPU) pair.
        limit: [n, T] a key must be below this.

    Returns:
        (found, partner): [n, T] whether each hot GPU swaps, and with which light GPU.
    """
    n, count, width = keys.shape
    found = torch.zeros(n, count, dtype=torch.bool)
    partner = torch.zeros(n, count, dtype=torch.int64)
    taken = torch.zeros(n, width, dtype=torch.bool)
    for t in range(count):
        key, partner[:, t] = keys[:, t].masked_fill(taken, torch.inf).min(dim=-1)
        found[:, t] = key < limit[:, t]
        taken[found[:, t], partner[found[:, t], t]] = True
    return found, partner


def _cost(
    pref: SwapPreference,
    rows: torch.Tensor,
    hot: torch.Tensor,
    a_expert: torch.Tensor,
    light: torch.Tensor,
    b_expert: torch.Tensor,
    top: torch.Tensor,
) -> torch.Tensor:
    """[n, T, K, S, S] cost class of each candidate swap times the top load `top` [n, 1].

    Added to a load below the top, any lower class beats any higher one.
    """
    n, count, per_gpu = a_expert.shape
    width = light.shape[1]
    unit = top.view(n, 1, 1, 1)
    cost_a = torch.zeros(n, count, width, per_gpu)  # a (hot GPU t, slot s) placed on light GPU k
    cost_b = torch.zeros(n, count, width, per_gpu)  # b (light GPU k, slot s) placed on hot GPU t
    if pref.held_before is not None:
        _, num_gpus, logical = pref.held_before.shape
        before = pref.held_before.view(-1)
        base = (rows * num_gpus).view(n, 1, 1, 1)
        on_b = (base + light.view(n, 1, width, 1)) * logical + a_expert.view(n, count, 1, per_gpu)
        on_hot = (base + hot.view(n, count, 1, 1)) * logical + b_expert.view(n, 1, width, per_gpu)
        cost_a += 2.0 * (~before[on_b.flatten()]).view(cost_a.shape)
        cost_b += 2.0 * (~before[on_hot.flatten()]).view(cost_b.shape)
    if pref.home_node is not None:
        home = pref.home_node[rows]
        node_of = pref.gpus_per_node
        home_a = home.gather(1, a_expert.view(n, -1)).view(n, count, 1, per_gpu)
        home_b = home.gather(1, b_expert).view(n, 1, width, per_gpu)
        cost_a += home_a != (light // node_of).view(n, 1, width, 1)
        cost_b += home_b != (hot // node_of).view(n, count, 1, 1)
    return (cost_a * unit).unsqueeze(4) + (cost_b * unit).unsqueeze(3)


def _apply(state: RefineState, a: torch.Tensor, b: torch.Tensor, per_gpu: int) -> None:
    """Swap slots a[r, t] and b[r, t] in every row, keeping shares, loads and held in step.

    Pairs within a row touch distinct GPUs (or are a slot with itself).
    """
    x, y = state.p2l.gather(1, a), state.p2l.gather(1, b)
    sx, sy = state.share.gather(1, a), state.share.gather(1, b)
    state.p2l.scatter_(1, a, y).scatter_(1, b, x)
    state.share.scatter_(1, a, sy).scatter_(1, b, sx)
    gpu_a, gpu_b = a // per_gpu, b // per_gpu
    state.load.scatter_add_(1, gpu_a, sy - sx).scatter_add_(1, gpu_b, sx - sy)
    rows = state.rows[:, None]
    cells = torch.cat(
        [
            state.cells(rows, gpu_a, x),
            state.cells(rows, gpu_a, y),
            state.cells(rows, gpu_b, y),
            state.cells(rows, gpu_b, x),
        ]
    )
    one = torch.ones_like(x, dtype=torch.int32)
    state.held.index_add_(0, cells.flatten(), torch.cat([-one, one, -one, one]).flatten())
