"""A disk cache fill coordinated across a fleet: one origin download per model, the rest copy it.

For a model key the replica does not have:

1. if Redis names a published copy on another replica, copy it from there
   (`peer_fill`, the replica-fill RPC); a copy that cannot be read is forgotten and
   the loop goes on;
2. else take the lease (fenced by its INCR token), download from the origin while
   renewing it, and publish with the compare-and-set: a replica that lost its lease
   keeps its own complete copy for its own clients but never names it to the others;
3. else another replica is downloading: wait until it publishes or its lease lapses
   (it died), and go round again.

The local copy is always made by `DiskCache.populate_here`, which writes into a
`.partial` directory and publishes it with a rename once complete, so no replica ever
serves, or hands on, a partial download. Redis unreachable: download from the origin
here, with a warning.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from weightserve.errors import UnavailableError
from weightserve.recording import NULL_RECORDER, Recorder
from weightserve.storage.coordination import Holder, RedisCoordinator, Unavailable

if TYPE_CHECKING:
    from weightserve.storage.disk_cache import DiskCache

logger = logging.getLogger(__name__)

PeerFill = Callable[[Holder, str, Path], None]
"""`peer_fill(copy, key, directory)`: copy the published files of `key` from the replica `copy` names,
only if its copy is the one with `copy.token`."""


class FleetFill:
    """Coordinates DiskCache.populate over the replicas that share one Redis.

    Args:
        coordinator: the Redis lease and `ready` record.
        peer_fill: copies a published model from another replica.
        wait_seconds: how long a replica waits for another's download in all before it
            gives up (UNAVAILABLE).
        recorder: where fills by source, lease waits, takeovers and lost leases are counted.
    """

    def __init__(
        self,
        coordinator: RedisCoordinator,
        peer_fill: PeerFill,
        wait_seconds: float = 3600.0,
        recorder: Recorder = NULL_RECORDER,
    ) -> None:
        self.coordinator = coordinator
        self.peer_fill = peer_fill
        self.wait_seconds = wait_seconds
        self.recorder = recorder
        self.origin_downloads = 0
        self.peer_fills = 0

    def populate(self, cache: DiskCache, key: str, nbytes: int, origin_fill: Callable[[Path], None]) -> Path:
        """The published local directory of `key`, filled from a peer or (once per fleet) the origin."""
        try:
            return self._coordinated(cache, key, nbytes, origin_fill)
        except Unavailable as e:
            logger.warning("%s; downloading %s from its origin without coordination", e, key)
            self.recorder.fleet_uncoordinated()
            return self._from_origin(cache, key, nbytes, origin_fill)

    def _from_origin(
        self, cache: DiskCache, key: str, nbytes: int, origin_fill: Callable[[Path], None], token: int = 0
    ) -> Path:
        path = self._fill(cache, key, nbytes, origin_fill, token, "origin")
        self.origin_downloads += 1
        return path

    def _fill(
        self, cache: DiskCache, key: str, nbytes: int, fill: Callable[[Path], None], token: int, source: str
    ) -> Path:
        """`cache.populate_here`, counting the copy under `source` when `fill` ran here (not when another
        process sharing this disk cache had published it already)."""
        ran = False

        def counted(directory: Path) -> None:
            nonlocal ran
            fill(directory)
            ran = True

        path = cache.populate_here(key, nbytes, counted, token)
        if ran:
            self.recorder.fleet_fill(source, _tree_bytes(path))
        return path

    def _coordinated(self, cache: DiskCache, key: str, nbytes: int, origin_fill: Callable[[Path], None]) -> Path:
        coordinator = self.coordinator
        deadline = time.monotonic() + self.wait_seconds
        waited: float | None = None  # seconds spent waiting on another replica's download; None: no wait
        try:
            while True:
                ready = coordinator.ready(key)
                if ready is not None and ready.address != coordinator.address:
                    try:
                        peer = partial(self.peer_fill, ready, key)
                        path = self._fill(cache, key, nbytes, peer, ready.token, "replica")
                    except (UnavailableError, OSError) as e:
                        logger.warning("cannot copy %s from %s (%s); asking the fleet again", key, ready.address, e)
                        coordinator.forget(key, ready)
                        continue
                    self.peer_fills += 1
                    logger.info("copied %s from replica %s (token %d)", key, ready.address, ready.token)
                    return path
                lease = coordinator.acquire(key)
                if lease is not None:
                    if waited is not None:  # the holder we waited on died or gave up unpublished
                        self.recorder.lease_takeover()
                        logger.info("took over the download lease on %s (token %d)", key, lease.token)
                    return self._lead(cache, key, nbytes, origin_fill, lease)
                if time.monotonic() >= deadline:
                    raise UnavailableError(f"{key}: waited {self.wait_seconds:.0f}s for another replica's download")
                if waited is None:
                    waited = 0.0
                    self.recorder.lease_waiting()
                began = time.monotonic()
                coordinator.wait(key, timeout=min(5.0, max(0.0, deadline - time.monotonic())))
                waited += time.monotonic() - began
        finally:
            if waited is not None:
                self.recorder.lease_waited(waited)

    def _lead(
        self, cache: DiskCache, key: str, nbytes: int, origin_fill: Callable[[Path], None], lease: Holder
    ) -> Path:
        coordinator = self.coordinator
        logger.info("downloading %s from its origin for the fleet (lease token %d)", key, lease.token)
        try:
            with coordinator.renewing(key, lease):
                path = self._from_origin(cache, key, nbytes, origin_fill, lease.token)
        except BaseException:
            with contextlib.suppress(Unavailable):  # else the lease lapses on its own
                coordinator.release(key, lease)
            raise
        if not coordinator.publish(key, lease):
            self.recorder.lease_lost()
            logger.warning(
                "lease on %s (token %d) was lost during the download: this copy serves this replica only",
                key,
                lease.token,
            )
        return path


def _tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` (a published model's files directory)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
