"""FetchShardSegments without gRPC: a rank's tensors as leased shared-memory segments and a ticket.

The plan is the same as FetchShard's (same manifest id, same selection by name); each
tensor becomes a range of a segment (cache/segments.py), the segments are leased, their
tensors' crc32c are filled into the manifest where the server did not know them yet, and
the side socket (server/fd_handoff.py) issues the one-time ticket that hands the
descriptors over. Until the ticket is redeemed (or expires) the grant holds the lease.
"""

from __future__ import annotations

import asyncio
import mmap
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

from weightserve import wire
from weightserve.cache.entry import ModelEntry
from weightserve.cache.manifests import Manifest
from weightserve.cache.segment_leases import SegmentLeases
from weightserve.cache.segments import Placement, Segment, placement_of
from weightserve.errors import PreconditionError
from weightserve.server.auth import current_caller
from weightserve.server.call_context import current_call
from weightserve.server.data_plane import DataPlane, selection_of
from weightserve.server.fd_handoff import TICKET_SECONDS, Handoff
from weightserve.sharding.spec import ShardSpec


@dataclass(frozen=True)
class TensorAt:
    """One tensor of a grant: index in the manifest, segment index, offset in it, crc32c."""

    index: int
    segment: int
    offset: int
    crc32c: int


@dataclass(frozen=True)
class SegmentGrant:
    """What FetchShardSegments answers."""

    manifest_id: str
    sizes: list[int]
    tensors: list[TensorAt]
    ticket: bytes
    socket: str
    ticket_ms: int


class SegmentPlane:
    """Grants a rank's segments to a client on the same host."""

    def __init__(self, plane: DataPlane, leases: SegmentLeases, handoff: Handoff | None, executor: Executor) -> None:
        self.plane = plane
        self.leases = leases
        self.handoff = handoff
        self.executor = executor

    async def grant(self, spec: ShardSpec, names: list[str] | None, manifest_id: str) -> SegmentGrant:
        """Lease the rank's segments and issue the ticket for their descriptors.

        Raises:
            PreconditionError: the server has no side socket (it listens on TCP), or
                `manifest_id` no longer matches the model.
            TensorNotFoundError: a name is not in the plan.
            ResourceExhaustedError: the memory budget has no room for the segments.
        """
        if self.handoff is None:
            raise PreconditionError(
                "shared memory needs a server listening on a Unix socket (--listen unix:PATH): "
                "its descriptors are handed over beside it; stream with FetchShard instead"
            )
        handoff = self.handoff
        cache = self.plane.cache
        async with self.plane.use(spec) as (entry, resolved):
            spec = current_call().note_spec(resolved)  # the version made explicit
            manifest = await self.plane.plan_for(entry, spec)
            if manifest_id and manifest_id != manifest.manifest_id:
                raise PreconditionError(
                    f"manifest {manifest_id} no longer matches model {spec.model!r} (now {manifest.manifest_id}); "
                    "fetch the manifest again"
                )
            selection = selection_of(manifest, names)
            index = entry.record_index()
            placed = [(i, placement_of(manifest.tensors[i].pieces, index)) for i in selection]
            placed = [(i, p) for i, p in placed if manifest.tensors[i].nbytes]
            segments = await self.leases.lease(entry, [p.spec for _, p in placed])
            try:
                crcs = await self._crcs(manifest, placed, segments)
                position = {segment.key: n for n, segment in enumerate(segments)}
                tensors = [TensorAt(i, position[p.spec.key], p.offset, crcs[i]) for i, p in placed]
                ticket = handoff.issue([s.fd for s in segments], self._releaser(entry, segments), current_caller().name)
            except BaseException:
                self.leases.release(entry, segments)
                raise
            nbytes = sum(manifest.tensors[i].nbytes for i, _ in placed)
            current_call().add_bytes(nbytes)
            cache.recorder.segments_granted(spec.model, spec.layout, nbytes)
        return SegmentGrant(
            manifest.manifest_id,
            [s.size for s in segments],
            tensors,
            ticket,
            str(handoff.path),
            int(TICKET_SECONDS * 1000),
        )

    def _releaser(self, entry: ModelEntry, segments: list[Segment]) -> Callable[[], None]:
        def release() -> None:
            self.leases.release(entry, segments)

        return release

    async def _crcs(
        self, manifest: Manifest, placed: Sequence[tuple[int, Placement]], segments: Sequence[Segment]
    ) -> dict[int, int]:
        """Each placed tensor's crc32c: the manifest's where known, else read from its segment once."""
        by_key = {s.key: s for s in segments}
        missing = [(i, p) for i, p in placed if i not in manifest.digests]
        if missing:
            loop = asyncio.get_running_loop()
            found = await loop.run_in_executor(
                self.executor,
                _segment_crcs,
                [(i, by_key[p.spec.key], p.offset, manifest.tensors[i].nbytes) for i, p in missing],
            )
            manifest.digests.update(found)
        return {i: manifest.digests[i] for i, _ in placed}


def _segment_crcs(ranges: Sequence[tuple[int, Segment, int, int]]) -> dict[int, int]:
    """crc32c of (tensor index, segment, offset, nbytes) ranges, each segment mapped read-only once."""
    by_segment: dict[int, list[tuple[int, int, int]]] = {}
    segments = {}
    for i, segment, offset, nbytes in ranges:
        by_segment.setdefault(id(segment), []).append((i, offset, nbytes))
        segments[id(segment)] = segment
    out: dict[int, int] = {}
    for key, wanted in by_segment.items():
        segment = segments[key]
        with mmap.mmap(segment.fd, segment.size, prot=mmap.PROT_READ) as mapped:
            view = memoryview(mapped)
            try:
                for i, offset, nbytes in wanted:
                    out[i] = wire.crc32c(view[offset : offset + nbytes])
            finally:
                view.release()
    return out
