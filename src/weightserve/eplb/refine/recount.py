"""Re-deciding which experts get the redundant replicas, one slot at a time.

When no swap lowers a layer's top load, the refinement tries rewriting one slot: a
replica of a donor expert x (which keeps at least one replica) becomes a replica of a
receiver expert y. x's remaining replicas each carry more tokens, y's fewer, so every
GPU holding x or y changes load. The step evaluates all such rewrites exactly, for

- donors: the experts of the heaviest replicas on the most loaded GPU, plus the few
  experts whose per-replica load would grow least, each from any GPU that holds it;
- receivers: the experts of the heaviest replicas on the most loaded GPU, plus the
  coldest experts,

and applies the one with the lowest resulting top load if it is below the current
top. Like a swap it lowers the sorted load vector, so the refinement still terminates.
A receiver is never placed on a GPU that already holds it.
"""

from __future__ import annotations

import torch

from weightserve.eplb.refine.state import RefineState, SwapPreference

# Candidates: the hot GPU's heaviest replicas' experts, the donors whose share would
# grow least, and the coldest receivers.
_HOT_EXPERTS = 3
_CHEAP_DONORS = 4
_COLD_RECEIVERS = 2


def recount_step(
    state: RefineState,
    idx: torch.Tensor,
    hot: torch.Tensor,
    limit: torch.Tensor,
    preference: SwapPreference | None,
) -> torch.Tensor:
    """Apply the best improving slot rewrite to each row in `idx`; [len(idx)] bool applied.

    Args:
        state: the refinement state (rows idx are positions in it).
        idx: [n] rows to try.
        hot: [n] each row's most loaded GPU.
        limit: [n] a rewrite must leave every GPU below this load.
        preference: cost classes, as for swaps.
    """
    n = idx.numel()
    gpus, logical = state.num_gpus, state.num_logical
    per_gpu = state.p2l.shape[1] // gpus
    weight, count = state.weight[idx], state.count[idx]
    p2l, load, rows = state.p2l[idx], state.load[idx], state.rows[idx]
    hot_slots = hot[:, None] * per_gpu + torch.arange(per_gpu)
    on_hot = p2l.gather(1, hot_slots)
    heavy = state.share[idx].gather(1, hot_slots)
    top_hot = on_hot.gather(1, heavy.topk(min(_HOT_EXPERTS, per_gpu), dim=1).indices)
    growth = torch.where(count > 1, weight / (count - 1).clamp(min=1) - weight / count, torch.inf)
    cheap = growth.topk(min(_CHEAP_DONORS, logical), dim=1, largest=False).indices
    cold = (weight / count).topk(min(_COLD_RECEIVERS, logical), dim=1, largest=False).indices
    donor, taker = torch.cat([top_hot, cheap], dim=1), torch.cat([top_hot, cold], dim=1)
    gpu = torch.arange(gpus)
    has_x = state.count_at(state.cells(rows[:, None, None], gpu, donor[:, :, None]))  # [n, X, G]
    has_y = state.count_at(state.cells(rows[:, None, None], gpu, taker[:, :, None]))  # [n, Y, G]
    cx, cy = count.gather(1, donor), count.gather(1, taker)
    wx, wy = weight.gather(1, donor), weight.gather(1, taker)
    x_after = wx / (cx - 1).clamp(min=1)
    y_after = wy / (cy + 1)
    # Every GPU's load if only the shares changed; then the donor GPU k also trades a
    # replica of x (at its new share) for one of y.
    base = load[:, None, None, :] + (has_x * (x_after - wx / cx)[:, :, None])[:, :, None, :]
    base = base - (has_y * (wy / cy - y_after)[:, :, None])[:, None, :, :]  # [n, X, Y, G]
    first, second = base.topk(2, dim=-1).values.unbind(-1)  # refine_swaps runs only with >= 2 GPUs
    rest = torch.where(base == first[..., None], second[..., None], first[..., None])
    worst = torch.maximum(rest, base - x_after[:, :, None, None] + y_after[:, None, :, None])
    ok = (has_x > 0)[:, :, None, :] & (cx > 1)[:, :, None, None] & (has_y == 0)[:, None, :, :]
    ok &= (donor[:, :, None] != taker[:, None, :])[..., None]
    ok &= worst < limit[:, None, None, None]
    key = worst
    if preference is not None:
        key = worst + _cost(preference, rows, taker, gpus) * load.max(dim=1).values[:, None, None, None]
    best_key, best = key.masked_fill_(~ok, torch.inf).view(n, -1).min(dim=1)
    done = best_key < torch.inf
    if not bool(done.any()):
        return done
    go = done.nonzero().flatten()
    pick = best[go]
    k = pick % gpus
    x = donor[go, pick // (taker.shape[1] * gpus)]
    y = taker[go, (pick // gpus) % taker.shape[1]]
    _rewrite(state, idx[go], k, x, y, per_gpu)
    return done


def _cost(pref: SwapPreference, rows: torch.Tensor, taker: torch.Tensor, gpus: int) -> torch.Tensor:
    """[n, 1, Y, G] cost class of putting receiver y on GPU k."""
    n, width = taker.shape
    cost = torch.zeros(n, 1, width, gpus, dtype=torch.float64)
    gpu = torch.arange(gpus)
    if pref.held_before is not None:
        logical = pref.held_before.shape[2]
        cell = (rows[:, None, None] * gpus + gpu) * logical + taker[:, :, None]
        cost += 2.0 * (~pref.held_before.view(-1)[cell.view(-1)]).view(n, 1, width, gpus)
    if pref.home_node is not None:
        home = pref.home_node[rows].gather(1, taker)
        cost += (home[:, :, None] != gpu // pref.gpus_per_node).view(n, 1, width, gpus)
    return cost


def _rewrite(
    state: RefineState, rows: torch.Tensor, k: torch.Tensor, x: torch.Tensor, y: torch.Tensor, per_gpu: int
) -> None:
    """On GPU k of each row, turn one replica of x into a replica of y; refresh shares and loads."""
    block = state.p2l[rows[:, None], k[:, None] * per_gpu + torch.arange(per_gpu)]
    slot = k * per_gpu + (block == x[:, None]).to(torch.int8).argmax(dim=1)
    state.p2l[rows, slot] = y
    state.count[rows, x] -= 1
    state.count[rows, y] += 1
    share = (state.weight[rows] / state.count[rows]).gather(1, state.p2l[rows])
    state.share[rows] = share
    state.load[rows] = share.view(rows.numel(), state.num_gpus, -1).sum(-1)
    orig = state.rows[rows]
    cells = torch.cat([state.cells(orig, k, x), state.cells(orig, k, y)])
    one = torch.ones_like(x, dtype=torch.int32)
    state.held.index_add_(0, cells, torch.cat([-one, one]))
