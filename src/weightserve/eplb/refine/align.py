"""Ways to keep experts where they already are while placing them afresh.

Every GPU holds the same number of slots, so renumbering the GPUs of a placement
changes no load; `match_gpus` renumbers them so each new GPU lands on the old GPU it
shares most experts with. `sticky_packing` packs replicas like DeepSeek's greedy
packing but lets a replica stay on a GPU that held its expert when that costs little.
"""

from __future__ import annotations

import torch

from weightserve.eplb.mapping import held_by_gpu

# Added to the load of a GPU that already holds the expert (far above any token count).
_AGAIN = 1e200


def match_gpus(phy2log: torch.Tensor, previous: torch.Tensor, num_logical: int, num_gpus: int) -> torch.Tensor:
    """Renumber each layer's GPUs (blocks of slots) to keep the most experts in place.

    Greedy matching on the overlap table: repeatedly pair the (new GPU, old GPU) that
    share the most experts among those still unpaired. Loads are unchanged.
    """
    return match_held(phy2log, held_by_gpu(previous, num_logical, num_gpus), num_logical, num_gpus)


def match_held(phy2log: torch.Tensor, held_before: torch.Tensor, num_logical: int, num_gpus: int) -> torch.Tensor:
    """`match_gpus` against [layers, num_gpus, num_logical] bool: what each GPU held before."""
    layers, num_physical = phy2log.shape
    per_gpu = num_physical // num_gpus
    now = held_by_gpu(phy2log, num_logical, num_gpus).to(torch.float32)
    before = held_before.to(torch.float32)
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


def sticky_packing(
    weight: torch.Tensor, counts: torch.Tensor, held_before: torch.Tensor, num_gpus: int, slack: torch.Tensor
) -> torch.Tensor:
    """Pack replicas onto GPUs heaviest first, preferring GPUs that held the expert before.

    Longest-processing-time packing with equal slot counts, except that a replica goes
    to the least loaded GPU that held its expert before when that GPU's load is within
    `slack` mean GPU loads of the least loaded GPU overall. A GPU never gets a second
    replica of an expert while another GPU with room lacks it.

    Args:
        weight: [rows, num_logical] token counts.
        counts: [rows, num_logical] int64 replicas per expert (each >= 1, rows summing
            to the slot count).
        held_before: [rows, num_gpus, num_logical] bool, what each GPU held before.
        num_gpus: GPUs.
        slack: [rows] how far (in mean GPU loads) staying may be from the best choice;
            0 keeps plain packing except on ties.

    Returns:
        phy2log [rows, num_physical].
    """
    rows, num_logical = weight.shape
    num_physical = int(counts[0].sum()) if rows else 0
    per_gpu = num_physical // num_gpus
    share = weight.to(torch.float64) / counts
    by_share = share.argsort(dim=1, descending=True, stable=True)
    ends = counts.gather(1, by_share).cumsum(dim=1)
    pos = torch.arange(num_physical).expand(rows, -1).contiguous()
    items = by_share.gather(1, torch.searchsorted(ends, pos, right=True))
    item_share = share.gather(1, items)
    # leave[r, i, g]: GPU g did not hold item i's expert before, so staying is not an option.
    leave = ~held_before.transpose(1, 2).gather(1, items.unsqueeze(2).expand(-1, -1, num_gpus))
    held = torch.zeros(rows * num_logical, num_gpus, dtype=torch.bool)  # [(row, expert), gpu]
    # A full GPU's load becomes +inf, so every min below only sees GPUs with room; a GPU
    # already holding the expert is pushed behind every GPU that does not.
    load = torch.zeros(rows, num_gpus, dtype=torch.float64)
    filled = torch.zeros(rows, num_gpus, dtype=torch.int64)
    room = (slack.to(torch.float64) * weight.to(torch.float64).sum(dim=1) / num_gpus).unsqueeze(1)
    chosen = torch.empty(rows, num_physical, dtype=torch.int64)
    row = torch.arange(rows)
    one = torch.ones(rows, 1, dtype=torch.int64)
    cell = row.unsqueeze(1) * num_logical + items  # [rows, P] row of `held` per item
    for step in range(num_physical):
        fresh = torch.add(load, held.index_select(0, cell[:, step]), alpha=_AGAIN)
        best, gpu = fresh.min(dim=1, keepdim=True)
        stay_load, stay = fresh.masked_fill(leave[:, step], torch.inf).min(dim=1, keepdim=True)
        gpu = torch.where(stay_load <= best + room, stay, gpu)
        chosen[:, step : step + 1] = gpu
        load.scatter_add_(1, gpu, item_share[:, step : step + 1])
        filled.scatter_add_(1, gpu, one)
        load.masked_fill_(filled == per_gpu, torch.inf)
        held.view(-1).index_fill_(0, cell[:, step] * num_gpus + gpu.squeeze(1), True)
    # Slot = GPU * per_gpu + the order in which the GPU received its replicas.
    by_gpu = chosen.argsort(dim=1, stable=True)
    gpus_sorted = chosen.gather(1, by_gpu)
    slot = gpus_sorted * per_gpu + torch.arange(num_physical) - torch.searchsorted(gpus_sorted, gpus_sorted)
    out = torch.empty(rows, num_physical, dtype=torch.int64)
    return out.scatter_(1, slot, items.gather(1, by_gpu))
