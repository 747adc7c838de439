"""Oracles the EPLB tests share: a brute-force optimum, a loop-by-loop DeepSeek
reference, and the invariants every mapping must satisfy."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch

from weightserve.eplb import ExpertMapping


def check_mapping(m: ExpertMapping, num_logical: int, num_physical: int, num_gpus: int) -> None:
    """phy2log, log2phy and logcnt agree; every expert has a replica; slots split evenly."""
    layers = m.num_layers
    assert m.phy2log.shape == (layers, num_physical)
    assert m.logcnt.shape == (layers, num_logical)
    assert m.topology.num_gpus == num_gpus
    assert num_physical % num_gpus == 0 and m.slots_per_gpu == num_physical // num_gpus
    assert int(m.logcnt.min()) >= 1
    assert torch.equal(m.logcnt.sum(dim=1), torch.full((layers,), num_physical))
    assert m.log2phy.shape == (layers, num_logical, int(m.logcnt.max()))
    for layer in range(layers):
        row = m.phy2log[layer].tolist()
        for expert in range(num_logical):
            slots = [p for p, e in enumerate(row) if e == expert]
            listed = m.log2phy[layer, expert].tolist()
            assert listed[: len(slots)] == slots  # ascending slot order
            assert all(x == -1 for x in listed[len(slots) :])  # -1 padding
            assert int(m.logcnt[layer, expert]) == len(slots)


def top_load(weight: list[float], phy2log: list[int], num_gpus: int) -> float:
    """Largest GPU load of one layer, replicas sharing their expert's tokens evenly."""
    counts = [phy2log.count(e) for e in range(len(weight))]
    per_gpu = len(phy2log) // num_gpus
    loads = [0.0] * num_gpus
    for slot, expert in enumerate(phy2log):
        loads[slot // per_gpu] += weight[expert] / counts[expert]
    return max(loads)


def _compositions(total: int, parts: int) -> Iterator[list[int]]:
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        yield [bounds[i + 1] - bounds[i] for i in range(parts)]


def _sub_multisets(counts: list[int], size: int) -> Iterator[list[int]]:
    if not counts:
        if size == 0:
            yield []
        return
    for k in range(min(counts[0], size) + 1):
        for rest in _sub_multisets(counts[1:], size - k):
            yield [k, *rest]


def brute_force_top(weight: list[float], num_physical: int, num_gpus: int) -> float:
    """The lowest achievable top GPU load for one layer, by exhaustive search.

    Enumerates every replica count vector (each expert >= 1) and every split of the
    replicas over the GPUs (2 or 3 GPUs); GPUs are interchangeable, so a split is a
    multiset per GPU.
    """
    per_gpu = num_physical // num_gpus
    best = float("inf")
    for counts in _compositions(num_physical, len(weight)):
        share = [w / c for w, c in zip(weight, counts, strict=True)]
        for first in _sub_multisets(counts, per_gpu):
            rest = [c - f for c, f in zip(counts, first, strict=True)]
            load0 = sum(k * s for k, s in zip(first, share, strict=True))
            if load0 >= best:
                continue
            splits = _sub_multisets(rest, per_gpu) if num_gpus == 3 else iter([rest])
            for second in splits:
                third = [r - s for r, s in zip(rest, second, strict=True)]
                loads = [load0, sum(k * s for k, s in zip(second, share, strict=True))]
                loads.append(sum(k * s for k, s in zip(third, share, strict=True)) if num_gpus == 3 else 0.0)
                best = min(best, max(loads))
    return best


def _pack(loads: list[np.float32], num_packs: int) -> tuple[list[int], list[int]]:
    """DeepSeek's balanced packing of one row, written out item by item."""
    items = len(loads)
    per_pack = items // num_packs
    if per_pack == 1:
        return list(range(items)), [0] * items
    order = sorted(range(items), key=lambda i: -float(loads[i]))  # stable: lower index first
    total = [np.float32(0)] * num_packs
    filled = [0] * num_packs
    pack, rank = [0] * items, [0] * items
    for item in order:
        choice = min((p for p in range(num_packs) if filled[p] < per_pack), key=lambda p: float(total[p]))
        pack[item], rank[item] = choice, filled[choice]
        total[choice] = np.float32(total[choice] + loads[item])
        filled[choice] += 1
    return pack, rank


def reference_greedy(weight: list[list[int]], num_physical: int, groups: int, nodes: int, gpus: int) -> list[list[int]]:
    """DeepSeek's published algorithm, one layer at a time, in plain Python (float32 math)."""
    if groups % nodes:
        groups = nodes = 1
    out = []
    for row in weight:
        w = [np.float32(x) for x in row]
        experts = len(w)
        size = experts // groups
        group_load = [np.float32(sum(w[g * size : (g + 1) * size], np.float32(0))) for g in range(groups)]
        node_of, rank_of = _pack(group_load, nodes)
        per_node_groups = groups // nodes
        slot_of_group = {g: node_of[g] * per_node_groups + rank_of[g] for g in range(groups)}
        by_slot = sorted(range(groups), key=slot_of_group.__getitem__)
        node_major = [g * size + i for g in by_slot for i in range(size)]  # mlog -> logical
        per_node = experts // nodes
        slots_per_node = num_physical // nodes
        layer = [0] * num_physical
        for node in range(nodes):
            mine = node_major[node * per_node : (node + 1) * per_node]
            count = [1] * per_node
            replicas = list(range(per_node))
            for _ in range(slots_per_node - per_node):
                share = [float(w[mine[i]] / np.float32(count[i])) for i in range(per_node)]
                hottest = share.index(max(share))
                replicas.append(hottest)
                count[hottest] += 1
            loads = [np.float32(w[mine[i]] / np.float32(count[i])) for i in replicas]
            gpu, rank = _pack(loads, gpus // nodes)
            per_gpu = num_physical // gpus
            for r, i in enumerate(replicas):
                layer[node * slots_per_node + gpu[r] * per_gpu + rank[r]] = mine[i]
        out.append(layer)
    return out
