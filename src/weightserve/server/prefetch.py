"""Prefetch: warm a model's chunks for given ranks before workers ask.

With an in-memory budget the chunks are read into the cache, so a later fetch of
those ranks reads nothing from storage; without one the kernel is asked to read the
ranks' byte ranges into the page cache. Either way the call returns at once (or,
with `wait`, when the warming is done) and progress shows in ListModels.

Parallel reads per prefetch: max(1, min(read_threads, 2 x files, ceil(bytes / 64 MiB))):
enough to keep every file busy on fast storage without one big prefetch taking the
whole read pool from the streams.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor

from weightserve.cache.entry import ModelEntry
from weightserve.cache.manifests import Manifest
from weightserve.cache.model_cache import ModelCache, Variant
from weightserve.config import ServerConfig
from weightserve.loaders.sources import FileSource
from weightserve.server.chunk_stream import chunk_jobs, read_chunk
from weightserve.server.request_limits import check_prefetch_ranks
from weightserve.sharding.spec import ShardSpec

logger = logging.getLogger(__name__)

WARM_UNIT = 64 * 1024 * 1024


def parallelism(num_files: int, nbytes: int, read_threads: int) -> int:
    """How many chunks one prefetch reads at once (the rule in the module docstring)."""
    return max(1, min(read_threads, 2 * num_files, math.ceil(nbytes / WARM_UNIT)))


class Warmer:
    """Runs prefetches as background tasks that pin their entry until done."""

    def __init__(
        self,
        cache: ModelCache,
        executor: Executor,
        config: ServerConfig,
        plan: Callable[[ModelEntry, ShardSpec], Manifest],
        resolve: Callable[[ShardSpec], Awaitable[tuple[ShardSpec, Variant | None]]] | None = None,
    ) -> None:
        self.cache = cache
        self.executor = executor
        self.config = config
        self.plan = plan
        self.resolve = resolve
        """Makes a spec's weight version explicit (the latest by default), so the version served is the one warmed."""
        self.tasks: set[asyncio.Task[None]] = set()

    async def prefetch(self, spec: ShardSpec, ranks: list[int], wait: bool) -> tuple[str, int]:
        """Start warming; returns (revision, bytes to warm).

        Raises:
            InvalidRequestError: a rank outside the world size, or an impossible split.
        """
        chosen = check_prefetch_ranks(ranks, spec.world_size)
        variant = None
        if self.resolve is not None:
            spec, variant = await self.resolve(spec)
        entry = await self.cache.acquire(spec.model, spec.format, spec.revision, variant)
        try:
            manifests = []
            for rank in chosen:
                manifests.append(self.plan(entry, ShardSpec(**{**spec.plan_params(), "rank": rank})))
                await asyncio.sleep(0)  # one plan at a time: other requests run between them
        except BaseException:
            self.cache.release(entry)
            raise
        total = sum(m.total_bytes for m in manifests)
        entry.warming += 1
        task = asyncio.ensure_future(self._warm(entry, manifests, total))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        if wait:
            await asyncio.shield(task)
        return entry.revision, total

    async def _warm(self, entry: ModelEntry, manifests: list[Manifest], total: int) -> None:
        try:
            if self.cache.keeps_chunks:
                await self._warm_chunks(entry, manifests, total)
            else:
                self._advise(entry, manifests)
        except Exception:
            logger.exception("prefetch of %s failed", entry.name)
        finally:
            entry.warming -= 1
            self.cache.release(entry)

    async def _warm_chunks(self, entry: ModelEntry, manifests: list[Manifest], total: int) -> None:
        loop = asyncio.get_running_loop()
        sources = entry.sources
        width = parallelism(len(entry.loader.files), total, self.config.read_threads)
        gate = asyncio.Semaphore(width)

        async def warm_one(manifest: Manifest, index: int, offset: int, length: int) -> None:
            plan = manifest.tensors[index]

            async def fill():  # type: ignore[no-untyped-def]
                return await loop.run_in_executor(
                    self.executor, read_chunk, plan, sources, index, offset, length, self.config.in_place_messages
                )

            async with gate:
                await self.cache.chunk(entry, (manifest.manifest_id, index, offset, length), fill)

        jobs = [
            warm_one(m, job.index, job.offset, job.length)
            for m in manifests
            for job in chunk_jobs(m.tensors, list(range(len(m.tensors))), 0, self.config.chunk_bytes)
        ]
        await asyncio.gather(*jobs)
        logger.info("prefetched %s: %d bytes resident", entry.name, entry.resident_bytes)

    @staticmethod
    def _advise(entry: ModelEntry, manifests: list[Manifest]) -> None:
        sources = entry.sources
        for manifest in manifests:
            for plan in manifest.tensors:
                for piece in plan.pieces:
                    source = sources[piece.source] if piece.source >= 0 else None
                    if isinstance(source, FileSource):
                        source.advise_willneed(piece.offset, piece.stride * (piece.rows - 1) + piece.row_bytes)
