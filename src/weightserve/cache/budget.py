"""The cache's memory budget: cached chunks plus the windows of streams in flight.

Cached chunks of entries no stream is reading are evicted least recently used first.
A stream's window (its read-ahead) is reserved for as long as it runs, and the bytes of a
shared-memory segment from the moment its build starts (until it is counted as the
entry's own, or fails), so requests at once are refused as one after another are; to make room for
one, the chunks of entries being streamed are dropped too (after the idle ones), since a
cached chunk is only a copy of file bytes. A request is refused with RESOURCE_EXHAUSTED
only when the other streams' windows (and what cannot be dropped) leave less than one
window free.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from weightserve.config import PROCESS_RESERVE, reserved_bytes
from weightserve.errors import ResourceExhaustedError
from weightserve.recording import NULL_RECORDER, Recorder

logger = logging.getLogger(__name__)


class Evictable(Protocol):
    """What the budget needs to know of a cache entry."""

    last_used: float

    @property
    def resident_bytes(self) -> int:
        """Bytes the entry holds that eviction would free."""

    @property
    def pinned(self) -> bool:
        """Whether a stream is reading the entry (it must not be evicted)."""

    def drop_chunks(self) -> int:
        """Drop every cached chunk; return the bytes freed."""


WINDOW_RETRY_SECONDS = 1.0
"""The retry-after hint of a refused window: streams end, or go idle and are cut, within seconds."""

# The reserve is computed in config, which refuses a budget too small to serve anything.
__all__ = ["PROCESS_RESERVE", "MemoryBudget", "reserved_bytes"]


class MemoryBudget:
    """Byte accounting for one server; `limit == 0` disables in-memory caching."""

    def __init__(
        self,
        limit: int,
        entries: Callable[[], Iterable[Evictable]],
        reserved: int = 0,
        recorder: Recorder = NULL_RECORDER,
    ) -> None:
        self.limit = limit
        self.recorder = recorder
        self.reserved = reserved
        self._entries = entries
        self.windows = 0
        self.building = 0
        """Bytes of shared-memory segments being built: not yet the entries' resident bytes."""
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def resident(self) -> int:
        return sum(e.resident_bytes for e in self._entries())

    def used(self) -> int:
        return self.reserved + self.resident() + self.windows + self.building

    def _evict_until(self, needed: int, *, pinned_too: bool = False) -> bool:
        """Evict entries' cached chunks, least recently used first, until `needed` bytes fit.

        Unpinned entries go first. With `pinned_too`, the chunks of entries being streamed
        go next: a cached chunk is only a copy of file bytes (a stream reads it again from
        the file), while a stream refused its window cannot run at all. Without that, a
        model whose own cached chunks filled the budget could never be fetched again.
        """
        if self.used() + needed <= self.limit:
            return True
        entries = sorted(self._entries(), key=lambda e: (e.pinned, e.last_used))
        for entry in entries:
            if entry.pinned and not pinned_too:
                break
            if entry.resident_bytes:
                freed = entry.drop_chunks()
                self.evictions += 1
                self.recorder.cache_eviction(freed)
                logger.info(
                    "dropped %d cached bytes of a %s model to make room for %d",
                    freed, "streamed" if entry.pinned else "idle", needed,
                )  # fmt: skip
            if self.used() + needed <= self.limit:
                return True
        return False

    def reserve_window(self, nbytes: int) -> None:
        """Reserve a stream's read-ahead window.

        Raises:
            ResourceExhaustedError: pinned entries and other windows leave too little.
        """
        if not self.enabled:
            return
        if not self._evict_until(nbytes, pinned_too=True):
            self.recorder.budget_refusal()
            raise ResourceExhaustedError(
                f"cache memory budget {self.limit} bytes: {self.windows} held by the windows of streams in flight, "
                f"{self.resident()} by manifests and chunks and {self.reserved} reserved for read buffers leave "
                f"less than the {nbytes}-byte window a stream needs; "
                "retry when streams finish, or raise --cache-memory",
                retry_after=WINDOW_RETRY_SECONDS,
            )
        self.windows += nbytes

    def release_window(self, nbytes: int) -> None:
        if self.enabled:
            self.windows -= nbytes

    def make_room(self, nbytes: int, what: str) -> None:
        """Make room for `nbytes` that must be held (new shared-memory segments), evicting as a window does.

        Raises:
            ResourceExhaustedError: what is leased and streamed leaves too little (with a retry hint).
        """
        if not self.enabled or self._evict_until(nbytes, pinned_too=True):
            return
        self.recorder.budget_refusal()
        raise ResourceExhaustedError(
            f"cache memory budget {self.limit} bytes: {self.resident()} held by chunks, manifests and leased "
            f"segments, {self.building} by segments being built and {self.windows} by stream windows leave less "
            f"than the {nbytes} bytes {what} needs; retry when clients release their segments, or raise --cache-memory",
            retry_after=WINDOW_RETRY_SECONDS,
        )

    def reserve_build(self, nbytes: int, what: str) -> None:
        """Make room for segments about to be built and hold it until `release_build`.

        A build takes a while on the read pool; until its segment is counted as the
        entry's, only this reservation keeps a concurrent request from claiming the same room.

        Raises:
            ResourceExhaustedError: as `make_room`.
        """
        self.make_room(nbytes, what)
        if self.enabled:
            self.building += nbytes

    def release_build(self, nbytes: int) -> None:
        """A build ended: its segment now counts as the entry's resident bytes, or it failed."""
        if self.enabled:
            self.building -= nbytes

    def admit(self, nbytes: int) -> bool:
        """Whether a chunk of `nbytes` may be kept (evicting unpinned entries to make room)."""
        return self.enabled and self._evict_until(nbytes)
