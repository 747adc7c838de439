"""Leasing shared-memory segments: built once however many ask, counted in the budget, released by leases.

A request for a rank's segments builds the missing ones on the read pool (one build
per segment however many requests want it at once), reserves their bytes in the memory
budget before it starts them (held until each is counted as the entry's, so requests at
once are refused exactly as one after another are), and leases every segment it returns.
Releasing the lease closes segments nobody else leases unless the budget has room to
keep them for the next client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Executor

from weightserve.cache.entry import ModelEntry
from weightserve.cache.model_cache import ModelCache
from weightserve.cache.segments import Segment, SegmentSpec, build_segment

ORPHAN_SECONDS = 30.0
"""A segment built but never leased this long ago (its requests were cancelled) is dropped."""


class SegmentLeases:
    """Segments of the cache's entries, leased to clients."""

    def __init__(self, cache: ModelCache, executor: Executor) -> None:
        self.cache = cache
        self.executor = executor
        self.built = 0
        self.built_bytes = 0

    async def lease(self, entry: ModelEntry, specs: Sequence[SegmentSpec]) -> list[Segment]:
        """The segments of `specs` (duplicates once), each leased once, in the order of their first spec.

        Raises:
            ResourceExhaustedError: the budget has no room for the segments still to build.
            CorruptCheckpointError: a file changed or was truncated while a segment was filled.
        """
        unique = list({spec.key: spec for spec in specs}.values())
        missing = [s for s in unique if entry.segments.get(s.key) is None and s.key not in entry.segment_builds]
        if missing:  # reserved and started with no await between: a request at once sees them building
            self.cache.budget.reserve_build(sum(s.size for s in missing), f"{len(missing)} new shared-memory segments")
        started = {spec.key: self._start_build(entry, spec) for spec in missing}
        leased: list[Segment] = []
        try:
            await asyncio.gather(*(self._leased(entry, spec, leased, started.get(spec.key)) for spec in unique))
        except BaseException:
            self.release(entry, leased)  # a failed or cancelled request holds nothing
            raise
        by_key = {segment.key: segment for segment in leased}
        return [by_key[spec.key] for spec in unique]

    def release(self, entry: ModelEntry, segments: Sequence[Segment]) -> None:
        """End a lease: segments nobody leases stay while the budget keeps chunks (and the entry serves)."""
        keep = self.cache.keeps_chunks and not entry.retired
        entry.segments.release(segments, keep_idle=keep)
        if not keep:  # and any a cancelled request had built but never leased
            entry.segments.drop_idle(older_than=ORPHAN_SECONDS)
        if entry.retired and not entry.segments.leased:
            entry.segments.drop_idle()
            self.cache.lingering.discard(entry)

    async def _leased(
        self, entry: ModelEntry, spec: SegmentSpec, leased: list[Segment], build: asyncio.Task[Segment] | None
    ) -> Segment:
        """The spec's segment (from `build`, when this request started it), leased the moment it is in hand."""
        while True:
            segment = await (asyncio.shield(build) if build is not None else self._segment(entry, spec))
            build = None  # dropped by an eviction before it was leased: looked up (or built) again
            if segment.fd >= 0:  # not dropped by an eviction between its build and now
                entry.segments.lease([segment])
                leased.append(segment)
                return segment

    async def _segment(self, entry: ModelEntry, spec: SegmentSpec) -> Segment:
        found = entry.segments.get(spec.key)
        if found is not None:
            self.cache.recorder.cache_lookup(True)
            return found
        task = entry.segment_builds.get(spec.key)
        if task is None:  # evicted since the request began: built again, its bytes reserved again
            self.cache.budget.reserve_build(spec.size, "a shared-memory segment dropped meanwhile")
            task = self._start_build(entry, spec)
        else:
            self.cache.recorder.single_flight_wait()
        return await asyncio.shield(task)

    def _start_build(self, entry: ModelEntry, spec: SegmentSpec) -> asyncio.Task[Segment]:
        """Build the spec's segment on the read pool (a cache miss), its bytes already reserved in the budget."""
        self.cache.recorder.cache_lookup(False)
        task = asyncio.ensure_future(self._build(entry, spec))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        entry.segment_builds[spec.key] = task
        task.add_done_callback(lambda _: entry.segment_builds.pop(spec.key, None))
        return task

    async def _build(self, entry: ModelEntry, spec: SegmentSpec) -> Segment:
        loop = asyncio.get_running_loop()
        try:
            segment = await loop.run_in_executor(self.executor, build_segment, spec, entry.sources, entry.name)
            self.built += 1
            self.built_bytes += segment.size
            self.cache.recorder.bytes_read(entry.source, segment.size)
            return entry.segments.add(segment)
        finally:  # counted as the entry's now (same step, no await), or failed
            self.cache.budget.release_build(spec.size)
