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
from weightserve.cache.segments import Placement, Segment, SegmentSpec, pack_small, placement_of
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
class RunAt:
    """Placed tensors of one dtype and shape lying back to back in one segment (a PlacementRun)."""

    segment: int
    offset: int
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    tensors: list[TensorAt]


@dataclass
class SegmentLayout:
    """Where a selection's tensors lie, worked out once per manifest for the whole plan.

    A plan of 10,000 small tensors costs tens of milliseconds to place; a client that
    fetches it again (or another rank of a replicated plan) pays nothing.
    """

    placed: list[tuple[int, Placement]]
    specs: list[SegmentSpec]
    """The distinct segments, in order of first use (the order their descriptors go out)."""
    tensors: list[TensorAt] | None = None
    """Every placed tensor with its segment position and crc32c, once the crcs are known."""
    runs: list[RunAt] | None = None
    """`tensors` grouped into runs, for clients that ask for runs."""
    encoded: bytes | None = None
    """`tensors` as the servicer encodes them, kept by it."""
    encoded_runs: bytes | None = None
    """`runs` as the servicer encodes them, kept by it."""
    nbytes: int = 0
    """Bytes of the placed tensors."""


@dataclass(frozen=True)
class SegmentGrant:
    """What FetchShardSegments answers."""

    manifest_id: str
    sizes: list[int]
    layout: SegmentLayout
    ticket: bytes
    socket: str
    ticket_ms: int

    @property
    def tensors(self) -> list[TensorAt]:
        assert self.layout.tensors is not None
        return self.layout.tensors

    @property
    def runs(self) -> list[RunAt]:
        assert self.layout.runs is not None
        return self.layout.runs


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
            PreconditionError: the server has no side socket (it listens on TCP), its side
                socket stopped accepting, or `manifest_id` no longer matches the model.
            TensorNotFoundError: a name is not in the plan.
            ResourceExhaustedError: the memory budget has no room for the segments.
        """
        if self.handoff is None:
            raise PreconditionError(
                "shared memory needs a server listening on a Unix socket (--listen unix:PATH): "
                "its descriptors are handed over beside it; stream with FetchShard instead"
            )
        handoff = self.handoff
        if not handoff.accepting:  # its ticket could never be redeemed: the client would wait out its timeout
            raise PreconditionError(
                f"shared memory is off: the server is listening on a Unix socket, but its side socket {handoff.path} "
                "stopped accepting (see the server's log); stream with FetchShard instead"
            )
        cache = self.plane.cache
        async with self.plane.use(spec) as (entry, resolved):
            spec = current_call().note_spec(resolved)  # the version made explicit
            manifest = await self.plane.plan_for(entry, spec)
            if manifest_id and manifest_id != manifest.manifest_id:
                raise PreconditionError(
                    f"manifest {manifest_id} no longer matches model {spec.model!r} (now {manifest.manifest_id}); "
                    "fetch the manifest again"
                )
            layout = self._layout(entry, manifest, names)
            segments = await self.leases.lease(entry, layout.specs)
            try:
                await self._place(manifest, layout, segments)
                ticket = handoff.issue([s.fd for s in segments], self._releaser(entry, segments), current_caller().name)
            except BaseException:
                self.leases.release(entry, segments)
                raise
            nbytes = layout.nbytes
            current_call().add_bytes(nbytes)
            cache.recorder.segments_granted(spec.model, spec.layout, nbytes)
        return SegmentGrant(
            manifest.manifest_id,
            [s.size for s in segments],
            layout,
            ticket,
            str(handoff.path),
            int(TICKET_SECONDS * 1000),
        )

    def _releaser(self, entry: ModelEntry, segments: list[Segment]) -> Callable[[], None]:
        def release() -> None:
            self.leases.release(entry, segments)

        return release

    @staticmethod
    def _layout(entry: ModelEntry, manifest: Manifest, names: list[str] | None) -> SegmentLayout:
        """The selection's placements (small tensors packed), kept on the manifest for the whole plan."""
        whole = not names
        if whole and isinstance(kept := manifest.memo.get("segments"), SegmentLayout):
            return kept
        index = entry.record_index()
        chosen = [i for i in selection_of(manifest, names) if manifest.tensors[i].nbytes]
        placements = pack_small([placement_of(manifest.tensors[i].pieces, index) for i in chosen])
        specs = list({p.spec.key: p.spec for p in placements}.values())
        nbytes = sum(manifest.tensors[i].nbytes for i in chosen)
        layout = SegmentLayout(list(zip(chosen, placements, strict=True)), specs, nbytes=nbytes)
        if whole:
            manifest.memo["segments"] = layout
        return layout

    async def _place(self, manifest: Manifest, layout: SegmentLayout, segments: Sequence[Segment]) -> None:
        """Fill in the layout's tensors: segment positions, and crc32c read once where the manifest lacks it."""
        if layout.tensors is not None:
            return
        by_key = {s.key: s for s in segments}
        missing = [(i, p) for i, p in layout.placed if i not in manifest.digests]
        if missing:
            loop = asyncio.get_running_loop()
            found = await loop.run_in_executor(
                self.executor,
                _segment_crcs,
                [(i, by_key[p.spec.key], p.offset, manifest.tensors[i].nbytes) for i, p in missing],
            )
            manifest.digests.update(found)
        position = {spec.key: n for n, spec in enumerate(layout.specs)}
        digests = manifest.digests
        tensors = [TensorAt(i, position[p.spec.key], p.offset, digests[i]) for i, p in layout.placed]
        layout.runs = runs_of(manifest, tensors)
        layout.tensors = tensors


def runs_of(manifest: Manifest, tensors: Sequence[TensorAt]) -> list[RunAt]:
    """Placed tensors grouped into runs: each next one of the same dtype and shape, in the same segment,
    starting where the last ended, joins the run (a layer's experts, a model's norms)."""
    runs: list[RunAt] = []
    last: RunAt | None = None
    for at in tensors:
        plan = manifest.tensors[at.index]
        if (
            last is not None
            and at.segment == last.segment
            and at.offset == last.offset + len(last.tensors) * last.nbytes
            and plan.nbytes == last.nbytes
            and plan.dtype == last.dtype
            and plan.shape == last.shape
        ):
            last.tensors.append(at)
            continue
        last = RunAt(at.segment, at.offset, plan.dtype, plan.shape, plan.nbytes, [at])
        runs.append(last)
    return runs


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
