"""Deltas between versions: the tensors of a rank's plan whose served bytes changed since a version.

A served tensor is unchanged when both versions read it from the same bytes (the same
file and offsets, or the same content-addressed blob), which needs no reading; otherwise
both versions' served bytes are compared, block by block, byte for byte: exact, so
stronger than any digest (a crc32c is too weak to decide equality, and a 128-bit hash
would have to read every byte of both anyway), and a slice that changed usually shows
it in its first block. So a dim-0 slice of a tensor whose other rows changed is not
sent, and a tensor republished with identical values is not either.

With `since_mapping` too (EP), the delta is the union: the tensors that changed and the
expert weights that moved.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from weightserve import wire
from weightserve.cache.entry import ModelEntry
from weightserve.cache.manifests import Manifest
from weightserve.loaders.pieces import read_range
from weightserve.loaders.sources import Source
from weightserve.sharding.spec import ShardSpec
from weightserve.sharding.tensor_plan import TensorPlan

if TYPE_CHECKING:
    from weightserve.server.data_plane import DataPlane

COMPARE_BLOCK = 4 << 20
FIRST_BLOCK = 16 << 10


async def plan_delta(plane: DataPlane, entry: ModelEntry, spec: ShardSpec) -> Manifest:
    """The rank's plan at `spec.version` restricted to what differs from `spec.since_version`."""
    assert spec.since_version is not None
    params = {**spec.plan_params(), "format": entry.format}
    since_mid = wire.manifest_id(entry.revision, params)
    cached = entry.manifests.get(since_mid)
    if cached is not None:
        return cached
    full = plane.plan(entry, replace(spec, since_version=None, since_mapping=None))
    moved: set[str] = set()
    if spec.since_mapping is not None:
        moved = {t.name for t in plane.plan(entry, replace(spec, since_version=None)).tensors}
    if spec.since_version == spec.version:
        changed: list[int] = []
    else:
        older = replace(spec, version=spec.since_version, since_version=None, since_mapping=None, revision="")
        async with plane.use(older) as (old_entry, old_spec):
            old = plane.plan(old_entry, old_spec)
            changed = await asyncio.get_running_loop().run_in_executor(
                plane.executor, changed_tensors, full, entry.sources, old, old_entry.sources
            )
    keep = sorted(set(changed) | {i for i, t in enumerate(full.tensors) if t.name in moved})
    manifest = Manifest(
        since_mid, entry.revision, entry.format, [full.tensors[i] for i in keep], full.chunk_bytes, full.experts,
        {n: full.digests[i] for n, i in enumerate(keep) if i in full.digests}, full.version,
    )  # fmt: skip
    return entry.manifests.get_or_build(since_mid, lambda: manifest)


def changed_tensors(
    new: Manifest, new_sources: Sequence[Source], old: Manifest, old_sources: Sequence[Source]
) -> list[int]:
    """Indices of `new`'s tensors whose served bytes differ from the same-named tensor of `old` (runs on the pool)."""
    old_index = {t.name: i for i, t in enumerate(old.tensors)}
    changed = []
    for i, plan in enumerate(new.tensors):
        j = old_index.get(plan.name)
        if j is None:
            changed.append(i)
            continue
        before = old.tensors[j]
        if (plan.dtype, plan.shape, plan.nbytes) != (before.dtype, before.shape, before.nbytes):
            changed.append(i)
        elif _same_bytes(plan, new_sources, before, old_sources):
            continue
        elif not _equal_bytes(plan, new_sources, before, old_sources):
            changed.append(i)
    return changed


def _same_bytes(a: TensorPlan, a_sources: Sequence[Source], b: TensorPlan, b_sources: Sequence[Source]) -> bool:
    """Whether two plans read the same bytes: piece for piece, from sources that hold the same content."""
    if len(a.pieces) != len(b.pieces):
        return False
    for x, y in zip(a.pieces, b.pieces, strict=True):
        if (x.offset, x.row_bytes, x.rows, x.stride) != (y.offset, y.row_bytes, y.rows, y.stride):
            return False
        if (x.source < 0) != (y.source < 0):
            return False
        if x.source >= 0 and a_sources[x.source].content_id() != b_sources[y.source].content_id():
            return False
    return True


def _equal_bytes(a: TensorPlan, a_sources: Sequence[Source], b: TensorPlan, b_sources: Sequence[Source]) -> bool:
    """Whether two served tensors of one size hold the same bytes.

    Blocks start small and double up to COMPARE_BLOCK: a retrained tensor differs in its
    first few bytes, so deciding it "changed" reads kilobytes, not megabytes, per rank.
    """
    left, right = bytearray(min(COMPARE_BLOCK, max(a.nbytes, 1))), bytearray(min(COMPARE_BLOCK, max(a.nbytes, 1)))
    done, size = 0, FIRST_BLOCK
    while done < a.nbytes:
        n = min(size, len(left), a.nbytes - done)
        x, y = memoryview(left)[:n], memoryview(right)[:n]
        read_range(a, a_sources, done, x)
        read_range(b, b_sources, done, y)
        if not np.array_equal(np.frombuffer(x, np.uint8), np.frombuffer(y, np.uint8)):  # memcmp speed
            return False
        done, size = done + n, size * 2
    return True
