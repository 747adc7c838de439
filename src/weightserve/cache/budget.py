"""The cache's memory budget: cached chunks plus the windows of streams in flight.

Cached chunks of entries no stream is reading are evicted least recently used first.
A stream's window (its read-ahead) is reserved for as long as it runs. A request is
refused with RESOURCE_EXHAUSTED only when pinned entries and other windows leave less
than one window free.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from weightserve.config import PROCESS_RESERVE, reserved_bytes
from weightserve.errors import ResourceExhaustedError

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

    def __init__(self, limit: int, entries: Callable[[], Iterable[Evictable]], reserved: int = 0) -> None:
        self.limit = limit
        self.reserved = reserved
        self._entries = entries
        self.windows = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def resident(self) -> int:
        return sum(e.resident_bytes for e in self._entries())

    def used(self) -> int:
        return self.reserved + self.resident() + self.windows

    def _evict_until(self, needed: int) -> bool:
        """Evict unpinned entries, least recently used first, until `needed` bytes fit."""
        if self.used() + needed <= self.limit:
            return True
        for entry in sorted((e for e in self._entries() if not e.pinned), key=lambda e: e.last_used):
            if entry.resident_bytes:
                freed = entry.drop_chunks()
                self.evictions += 1
                logger.info("evicted %d cached bytes to make room for %d", freed, needed)
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
        if not self._evict_until(nbytes):
            raise ResourceExhaustedError(
                f"cache memory budget {self.limit} bytes: {self.resident()} held by models being streamed, "
                f"{self.windows} by stream windows and {self.reserved} reserved for read buffers leave less "
                f"than the {nbytes}-byte window a stream needs; "
                "retry when streams finish, or raise --cache-memory",
                retry_after=WINDOW_RETRY_SECONDS,
            )
        self.windows += nbytes

    def release_window(self, nbytes: int) -> None:
        if self.enabled:
            self.windows -= nbytes

    def admit(self, nbytes: int) -> bool:
        """Whether a chunk of `nbytes` may be kept (evicting unpinned entries to make room)."""
        return self.enabled and self._evict_until(nbytes)
