"""Cheap ways to keep experts where they already are.

Every GPU holds the same number of slots, so renumbering the GPUs of a placement
changes no load; `match_gpus` renumbers them so each new GPU lands on the old GPU it
shares most experts with. `recount` changes replica counts by rewriting only the slots
whose expert must change.
"""

from __future__ import annotations

import torch

from weightserve.eplb.mapping import gpu_loads, held_by_gpu, replica_counts


def match_gpus(phy2log: torch.Tensor, previous: torch.Tensor, num_logical: int, num_gpus: int) -> torch.Tensor:
    """Renumber each layer's GPUs (blocks of slots) to keep the most experts in place.

    Greedy matching on the overlap table: repeatedly pair the (new GPU, old GPU) that
    share the most experts among those still unpaired. Loads are unchanged.
    """
    layers, num_physical = phy2log.shape
    per_gpu = num_physical // num_gpus
    now = held_by_gpu(phy2log, num_logical, num_gpus).to(torch.float32)
    before = held_by_gpu(previous, num_logical, num_gpus).to(torch.float32)
    overlap = torch.bmm(now, before.transpose(1, 2))  # [layers, new GPU, old GPU]
    dest = torch.empty(layers, num_gpus, dtype=torch.int64)
    rows = torch.arange(layers)
    for _ in range(num_gpus):
        flat = overlap.view(layers, -1).argmax(dim=-1)
        new, old = flat // num_gpus, flat % num_gpus
        dest[rows, new] = old
        overlap[rows, new, :] = -1.0
        overlap[rows, :, old] = -1.0
    out = torch.empty_like(phy2log)
    blocks = phy2log.view(layers, num_gpus, per_gpu)
    out.view(layers, num_gpus, per_gpu).scatter_(1, dest[:, :, None].expand(-1, -1, per_gpu), blocks)
    return out


def recount(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int, counts: torch.Tensor) -> torch.Tensor:
    """Rewrite the fewest slots so that expert e has counts[layer, e] replicas.

    An expert with too many replicas gives up the ones on its most loaded GPUs; the
    freed slots go to the experts short of replicas, the heaviest new replica to the
    least loaded GPU's freed slot.

    Args:
        weight: [layers, num_logical] token counts.
        phy2log: [layers, num_physical] current placement.
        num_gpus: GPUs.
        counts: [layers, num_logical] int64 wanted replica counts, each >= 1, each row
            summing to num_physical.
    """
    layers, num_physical = phy2log.shape
    num_logical = weight.shape[1]
    have = replica_counts(phy2log, num_logical)
    per_gpu = num_physical // num_gpus
    slot_load = gpu_loads(weight, phy2log, num_gpus).repeat_interleave(per_gpu, dim=1)
    # Order slots by (expert, load of their GPU); an expert keeps its first counts[e].
    by_load = slot_load.argsort(dim=1, stable=True)
    order = by_load.gather(1, phy2log.gather(1, by_load).argsort(dim=1, stable=True))
    expert = phy2log.gather(1, order)
    replica = torch.arange(num_physical) - torch.searchsorted(expert, expert)
    freed = torch.zeros(layers, num_physical, dtype=torch.bool)
    freed.scatter_(1, order, replica >= counts.gather(1, expert))
    short = (counts - have).clamp(min=0)
    most = int(short.sum(dim=1).max()) if layers else 0
    if most == 0:
        return phy2log.clone()
    # The new replicas, heaviest per-replica load first, one entry per missing replica.
    by_share = (weight.to(torch.float64) / counts).argsort(dim=1, descending=True)
    ends = short.gather(1, by_share).cumsum(dim=1)
    pos = torch.arange(most).expand(layers, -1).contiguous()
    newcomer = by_share.gather(1, torch.searchsorted(ends, pos, right=True).clamp(max=num_logical - 1))
    slots = torch.where(freed, slot_load, torch.inf).argsort(dim=1)[:, :most]
    valid = pos < short.sum(dim=1, keepdim=True)
    out = phy2log.clone()
    row = torch.arange(layers)[:, None].expand(-1, most)
    out[row[valid], slots[valid]] = newcomer[valid]
    return out
