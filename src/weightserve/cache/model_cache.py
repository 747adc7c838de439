"""The model cache: one open copy of each model revision, shared by every stream.

Entries are keyed by (source, model, format, revision). Opening is single-flight:
concurrent first requests wait for the one load, and a failed load releases them all
with its error. Chunk reads are single-flight too, so no byte is read twice per
entry while it stays cached. When a model's files change, the next request opens the
new revision; the old entry stays usable by streams in flight and closes after them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from weightserve.cache.budget import MemoryBudget
from weightserve.cache.entry import CachedChunk, CachedPack, ChunkKey, LoadStats, ModelEntry
from weightserve.errors import PreconditionError
from weightserve.loaders import loader_for
from weightserve.loaders.base import Loader
from weightserve.loaders.formats import ModelFiles, files_at
from weightserve.recording import NULL_RECORDER, Recorder
from weightserve.sharding.model_config import ModelConfig
from weightserve.storage.base import ModelLocation
from weightserve.storage.router import StorageRouter

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _detached(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """A task whose failure is reported to its awaiters, never as 'exception never retrieved'."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark a future's failure as seen (its awaiters get it; nobody needs 'exception never retrieved')."""
    if not future.cancelled():
        future.exception()


def _forget(entry: ModelEntry, key: ChunkKey) -> Callable[[asyncio.Future[CachedChunk]], None]:
    def forget(_: asyncio.Future[CachedChunk]) -> None:
        entry.inflight.pop(key, None)

    return forget


def model_config_for(loader: Loader, model_dir: Path) -> ModelConfig:
    """The directory's config.json when it has one, else the checkpoint's own (GGUF metadata).

    A loader that owns its config (dummy weights) is the exception: its config is the model's.
    """
    raw = None if (model_dir / "config.json").is_file() and not loader.owns_config else loader.model_config_dict()
    return ModelConfig.from_dict(raw) if raw is not None else ModelConfig.from_dir(model_dir)


EntryKey = tuple[str, str, str]
"""(model name, format, revision); the name carries the source scheme, a variant's revision its tag."""


@dataclass(frozen=True)
class Variant:
    """The model's files served through another loader: a published version of the weights.

    `wrap(loader, revision)` takes the loader of the files as found (at `revision`) and
    returns the one to serve (it owns the loader it is given); `tag` names the variant
    in the entry's revision.
    """

    tag: str
    wrap: Callable[[Loader, str], Loader]


@dataclass(frozen=True)
class CacheStatus:
    """A model's state in the cache, as ListModels reports it."""

    state: str  # cold, loading, warming, ready
    resident_bytes: int = 0
    pinned_streams: int = 0
    last_used: float = 0.0
    load_source: str = ""
    load_files: int = 0
    load_bytes: int = 0
    load_seconds: float = 0.0


class ModelCache:
    """Opens models on demand, shares each open copy, keeps chunks within a budget."""

    def __init__(
        self, router: StorageRouter, memory_bytes: int = 0, reserved_bytes: int = 0,
        loaders: Mapping[str, str] | None = None, recorder: Recorder = NULL_RECORDER,
    ) -> None:  # fmt: skip
        self.router = router
        self.recorder = recorder
        self.loaders = dict(loaders or {})
        """format -> the loader that opens it instead of the format's own (`serve --loader`)."""
        self.entries: dict[EntryKey, ModelEntry] = {}
        """Open entries by key; read through open_entries() and status() outside this package."""
        self.current: dict[tuple[str, str, str], EntryKey] = {}
        """(name, format, variant tag) -> the key of the entry serving it now."""
        self.lingering: set[ModelEntry] = set()
        """Retired entries whose shared-memory segments clients still lease (still counted in the budget)."""
        self.budget = MemoryBudget(
            memory_bytes, lambda: [*self.entries.values(), *self.lingering], reserved_bytes, recorder
        )
        self._loads: dict[EntryKey, asyncio.Task[ModelEntry]] = {}
        self.loads_started = 0

    @asynccontextmanager
    async def use(
        self, name: str, fmt: str = "", revision: str = "", variant: Variant | None = None
    ) -> AsyncIterator[ModelEntry]:
        """Pin an entry for the duration of a request.

        Raises:
            ModelNotFoundError: unknown model or format.
            PermissionDeniedError: a remote source the operator did not allow.
            PreconditionError: `revision` is pinned and the model now has another.
        """
        entry = await self.acquire(name, fmt, revision, variant)
        try:
            yield entry
        finally:
            self.release(entry)

    async def acquire(self, name: str, fmt: str = "", revision: str = "", variant: Variant | None = None) -> ModelEntry:
        """Pin and return the current entry for a model (release() it after).

        `revision` pins the files' revision (a variant's revision, `REV+TAG`, pins them
        too); `variant` serves the files through another loader (a published version).
        """
        location = await asyncio.to_thread(self.router.resolve, name)
        found = await asyncio.to_thread(files_at, location, fmt)
        pinned = revision.split("+", 1)[0]
        if pinned and pinned != found.revision:
            raise PreconditionError(
                f"model {name!r} is at revision {found.revision}, not the pinned {pinned}; "
                "its files changed: fetch the manifest again"
            )
        tag = variant.tag if variant is not None else ""
        key = (name, found.format, f"{found.revision}+{tag}" if tag else found.revision)
        entry = self.entries.get(key)
        if entry is None or entry.retired:
            entry = await self._load(key, location, found, variant)
        entry.pins += 1
        entry.touch()
        return entry

    def release(self, entry: ModelEntry) -> None:
        entry.pins -= 1
        entry.touch()
        entry.close_if_unused()

    async def _load(
        self, key: EntryKey, location: ModelLocation, found: ModelFiles, variant: Variant | None = None
    ) -> ModelEntry:
        """Open once however many requests ask; the load outlives a caller that gives up."""
        task = self._loads.get(key)
        if task is not None:
            self.recorder.single_flight_wait()
        else:
            self.loads_started += 1
            task = _detached(self._open(key, location, found, variant))
            self._loads[key] = task
            task.add_done_callback(lambda _: self._loads.pop(key, None))
        return await asyncio.shield(task)

    async def _open(
        self, key: EntryKey, location: ModelLocation, found: ModelFiles, variant: Variant | None
    ) -> ModelEntry:
        started = time.perf_counter()
        loader = await asyncio.to_thread(loader_for(self.loaders.get(found.format, found.format)), found.files)
        try:
            if variant is not None:
                loader = await asyncio.to_thread(variant.wrap, loader, found.revision)
            model_config = await asyncio.to_thread(model_config_for, loader, found.model_dir)
            total = await asyncio.to_thread(lambda: found.total_bytes)
        except BaseException:
            loader.close()
            raise
        stats = LoadStats(location.source, len(found.files), total, time.perf_counter() - started)
        self.recorder.model_loaded(location.source, total, stats.seconds)
        entry = ModelEntry(key[0], location.source, found.format, key[2], loader, model_config, stats)
        serving = (key[0], key[1], variant.tag if variant is not None else "")
        previous = self.current.get(serving)
        if previous is not None and previous in self.entries and previous != key:
            self._retire(self.entries.pop(previous))
        self.entries[key] = entry
        self.current[serving] = key
        logger.info(
            "opened %s: %s, %d tensors, %d bytes, revision %s, source %s",
            key[0],
            found.format,
            len(loader.records),
            total,
            found.revision,
            location.source,
        )
        return entry

    async def chunk(self, entry: ModelEntry, key: ChunkKey, fill: Callable[[], Awaitable[CachedChunk]]) -> CachedChunk:
        """A chunk from the cache, or from `fill()` once however many streams ask at once.

        The fill runs as its own task: a stream that disconnects does not cancel the
        read another stream is waiting for.
        """
        cached = entry.cached_chunk(key)
        if cached is not None:
            self.recorder.cache_lookup(True)
            self.recorder.bytes_read("cache", key[3])
            return cached
        task = entry.inflight.get(key)
        if task is not None:
            self.recorder.single_flight_wait()
        else:
            self.recorder.cache_lookup(False)
            task = _detached(self._fill(entry, key, fill))
            entry.inflight[key] = task
            task.add_done_callback(lambda _: entry.inflight.pop(key, None))
        return await asyncio.shield(task)

    async def _fill(self, entry: ModelEntry, key: ChunkKey, fill: Callable[[], Awaitable[CachedChunk]]) -> CachedChunk:
        chunk = await fill()
        self.recorder.bytes_read(entry.source, key[3])
        if not entry.retired and self.budget.admit(len(chunk.message)):
            entry.keep(key, chunk)
        return chunk

    async def pack(
        self, entry: ModelEntry, keys: list[ChunkKey], read: Callable[[list[CachedChunk | None]], Awaitable[CachedPack]]
    ) -> CachedPack:
        """A packed chunk of whole tensors, each tensor's bytes read once however many streams ask.

        Tensors the cache holds are handed to `read` as they are; tensors another read is
        filling (a chunk or another pack) are waited for and handed over too; `read`
        reads the rest (the None entries) and returns their canonical chunks, which
        later readers wait on and the cache keeps while the budget admits them. Like
        `chunk`, the read runs detached: a stream that goes away fails no other.
        """
        known: list[CachedChunk | None] = [entry.cached_chunk(key) for key in keys]
        waits = {n: entry.inflight[key] for n, key in enumerate(keys) if known[n] is None and key in entry.inflight}
        mine = [n for n, key in enumerate(keys) if known[n] is None and n not in waits]
        hits = sum(keys[n][3] for n, chunk in enumerate(known) if chunk is not None)
        self.recorder.cache_lookup(not mine)  # one lookup a pack: a miss when it reads anything
        self.recorder.bytes_read("cache", hits)
        if waits:
            self.recorder.single_flight_wait()
        loop = asyncio.get_running_loop()
        filling: dict[int, asyncio.Future[CachedChunk]] = {n: loop.create_future() for n in mine}
        for n, future in filling.items():
            future.add_done_callback(_retrieved)
            entry.inflight[keys[n]] = future
            future.add_done_callback(_forget(entry, keys[n]))

        async def fill() -> CachedPack:
            try:
                for n, waiting in waits.items():
                    known[n] = await asyncio.shield(waiting)
                pack = await read(known)
            except BaseException as e:
                for future in filling.values():
                    if isinstance(e, Exception):
                        future.set_exception(e)
                    else:  # cancelled (the server is stopping): so are the waiters
                        future.cancel()
                raise
            self.recorder.bytes_read(entry.source, sum(keys[n][3] for n in mine))
            for n, future in filling.items():
                chunk = pack.chunks[n]
                assert chunk is not None, "a pack returns the chunk of every tensor it read"
                future.set_result(chunk)
                if not entry.retired and self.budget.admit(len(chunk.message)):
                    entry.keep(keys[n], chunk)
            return pack

        return await asyncio.shield(_detached(fill()))

    @property
    def keeps_chunks(self) -> bool:
        """Whether chunks are kept in memory (a --cache-memory budget), or pass through the page cache."""
        return self.budget.enabled

    def loading(self) -> list[EntryKey]:
        """Entries being opened right now."""
        return list(self._loads)

    async def locate(self, name: str) -> ModelLocation:
        """Where `name`'s files are (a remote model may download first); off the event loop.

        Raises:
            ModelNotFoundError, PermissionDeniedError: as StorageRouter.resolve.
        """
        return await asyncio.to_thread(self.router.resolve, name)

    def local_models(self) -> dict[str, ModelLocation]:
        """Every local model by name (blocking: walks the roots)."""
        return self.router.list_local()

    def open_entries(self) -> list[ModelEntry]:
        """Entries serving now (not retired), in no particular order."""
        return [e for e in self.entries.values() if not e.retired]

    def status(self, name: str) -> CacheStatus:
        """The cache state of the newest entry of `name`."""
        if any(key[0] == name for key in self._loads):
            return CacheStatus("loading")
        entries = [e for e in self.open_entries() if e.name == name]
        if not entries:
            return CacheStatus("cold")
        entry = max(entries, key=lambda e: e.last_used)
        load = entry.load
        return CacheStatus(
            "warming" if entry.warming else "ready",
            entry.resident_bytes,
            entry.pins - entry.warming,
            entry.last_used_wall,
            load.source,
            load.files,
            load.bytes,
            load.seconds,
        )

    @contextmanager
    def stream_window(self, nbytes: int) -> Iterator[None]:
        """Hold a stream's read-ahead window in the memory budget for the block.

        Raises:
            ResourceExhaustedError: pinned entries and other windows leave too little.
        """
        self.budget.reserve_window(nbytes)
        try:
            yield
        finally:
            self.budget.release_window(nbytes)

    def evict(self, name: str) -> bool:
        """Drop every entry of `name`; streams in flight keep theirs until they end."""
        keys = [key for key in self.entries if key[0] == name]
        for key in keys:
            entry = self.entries.pop(key)
            for serving in [k for k, v in self.current.items() if v == key]:
                del self.current[serving]
            entry.drop_chunks()
            self._retire(entry)
        return bool(keys)

    def _retire(self, entry: ModelEntry) -> None:
        """Stop serving an entry: streams and segment leases in flight keep it until they end."""
        entry.retired = True
        if entry.segments.leased:
            self.lingering.add(entry)
        entry.close_if_unused()

    def close(self) -> None:
        """Close everything (at shutdown, after streams have drained)."""
        for name in {key[0] for key in self.entries}:
            self.evict(name)
