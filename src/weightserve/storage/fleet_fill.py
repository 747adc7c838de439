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
    """

    def __init__(self, coordinator: RedisCoordinator, peer_fill: PeerFill, wait_seconds: float = 3600.0) -> None:
        self.coordinator = coordinator
        self.peer_fill = peer_fill
        self.wait_seconds = wait_seconds
        self.origin_downloads = 0
        self.peer_fills = 0

    def populate(self, cache: DiskCache, key: str, nbytes: int, origin_fill: Callable[[Path], None]) -> Path:
        """The published local directory of `key`, filled from a peer or (once per fleet) the origin."""
        try:
            return self._coordinated(cache, key, nbytes, origin_fill)
        except Unavailable as e:
            logger.warning("%s; downloading %s from its origin without coordination", e, key)
            return self._from_origin(cache, key, nbytes, origin_fill)

    def _from_origin(
        self, cache: DiskCache, key: str, nbytes: int, origin_fill: Callable[[Path], None], token: int = 0
    ) -> Path:
        path = cache.populate_here(key, nbytes, origin_fill, token)
        self.origin_downloads += 1
        return path

    def _coordinated(self, cache: DiskCache, key: str, nbytes: int, origin_fill: Callable[[Path], None]) -> Path:
        coordinator = self.coordinator
        deadline = time.monotonic() + self.wait_seconds
        while True:
            ready = coordinator.ready(key)
            if ready is not None and ready.address != coordinator.address:
                try:
                    path = cache.populate_here(key, nbytes, partial(self.peer_fill, ready, key), ready.token)
                except (UnavailableError, OSError) as e:
                    logger.warning("cannot copy %s from %s (%s); asking the fleet again", key, ready.address, e)
                    coordinator.forget(key, ready)
                    continue
                self.peer_fills += 1
                logger.info("copied %s from replica %s (token %d)", key, ready.address, ready.token)
                return path
            lease = coordinator.acquire(key)
            if lease is not None:
                return self._lead(cache, key, nbytes, origin_fill, lease)
            if time.monotonic() >= deadline:
                raise UnavailableError(f"{key}: waited {self.wait_seconds:.0f}s for another replica's download")
            coordinator.wait(key, timeout=min(5.0, max(0.0, deadline - time.monotonic())))

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
            logger.warning(
                "lease on %s (token %d) was lost during the download: this copy serves this replica only",
                key,
                lease.token,
            )
        return path
