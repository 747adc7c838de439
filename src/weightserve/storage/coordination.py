"""One origin download per model across replicas: a fenced Redis lease and a compare-and-set `ready`.

Keys, for a model key K (the disk cache's key, `s3://bucket/prefix@revision`):

    weightserve:token              INCR counter: every lease gets a new, larger token
    weightserve:lease:K            "<token> <address>", SET NX with expiry, renewed while downloading
    weightserve:ready:K            "<token> <address>": the one copy readers may use

A replica that misses K takes the lease (token from INCR), downloads into a directory
named by its token, and publishes by a Lua compare-and-set that writes `ready` only while
the lease still holds its token; a replica whose lease expired (it stalled, or another
took over) cannot publish, and its copy is never named. The others wait for `ready` (or
for the lease to lapse, then take it themselves) and fill from the replica `ready` names.

Redis being unreachable is not fatal: `Unavailable` tells the caller to download on its
own, which it does with a warning (the fleet then pays N origin reads, as without Redis).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

PREFIX = "weightserve"

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
"""Extend the lease only while it still holds our token."""

_PUBLISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local ready = redis.call('GET', KEYS[2])
if ready and tonumber(string.match(ready, '^%d+')) > tonumber(ARGV[2]) then
  return 0
end
redis.call('SET', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[1])
return 1
"""
"""ready := our lease value, only while the lease is ours and no later token published."""

_ACQUIRE = """
local ready = redis.call('GET', KEYS[2])
if ready and string.sub(ready, (string.find(ready, ' ') or 0) + 1) ~= ARGV[2] then
  return 0
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[3]) then
  return 1
end
return 0
"""
"""Take the lease unless another replica's copy is already named ready (it was published
between our look at `ready` and this call: copy that one instead of downloading again)."""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Unavailable(Exception):
    """Redis cannot be reached: download without coordination."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lease or published a copy: the fencing token and the replica's address."""

    token: int
    address: str

    @classmethod
    def parse(cls, value: bytes | str) -> Holder:
        text = value.decode() if isinstance(value, bytes) else value
        token, _, address = text.partition(" ")
        return cls(int(token), address)

    def value(self) -> str:
        return f"{self.token} {self.address}"


class RedisCoordinator:
    """Leases and the `ready` record in one Redis, for the replica reachable at `address`.

    Args:
        url: redis://HOST:PORT[/DB].
        address: how other replicas reach this one's replica-fill RPC ("10.0.0.5:50051").
        lease_seconds: a lease's expiry; renewed every third of it while held.
        client: a redis.Redis to use instead of one built from `url` (tests).
    """

    def __init__(self, url: str, address: str, lease_seconds: float = 30.0, client: Any = None) -> None:
        if client is None:
            try:
                import redis
            except ImportError as e:
                raise ImportError(
                    "--coordination redis:// needs the redis client: pip install 'weightserve[fleet]'"
                ) from e
            client = redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0)
        self.url = url
        self.address = address
        self.lease_ms = int(lease_seconds * 1000)
        self._redis = client
        self._renew = client.register_script(_RENEW)
        self._publish = client.register_script(_PUBLISH)
        self._release = client.register_script(_RELEASE)
        self._acquire = client.register_script(_ACQUIRE)

    def _key(self, kind: str, key: str) -> str:
        return f"{PREFIX}:{kind}:{key}"

    @contextmanager
    def _redis_errors(self) -> Iterator[None]:
        import redis

        try:
            yield
        except redis.RedisError as e:
            raise Unavailable(f"redis at {self.url}: {e}") from e

    def ready(self, key: str) -> Holder | None:
        """The published copy of `key`, if any."""
        with self._redis_errors():
            value = self._redis.get(self._key("ready", key))
        return Holder.parse(value) if value else None

    def holder(self, key: str) -> Holder | None:
        """Who holds the download lease of `key` now, if anyone."""
        with self._redis_errors():
            value = self._redis.get(self._key("lease", key))
        return Holder.parse(value) if value else None

    def acquire(self, key: str) -> Holder | None:
        """Take the download lease of `key` with a fresh token; None when another replica holds it
        or has published its copy meanwhile."""
        with self._redis_errors():
            token = int(self._redis.incr(f"{PREFIX}:token"))
            mine = Holder(token, self.address)
            keys = [self._key("lease", key), self._key("ready", key)]
            taken = self._acquire(keys=keys, args=[mine.value(), self.address, self.lease_ms])
        return mine if taken else None

    def renew(self, key: str, lease: Holder) -> bool:
        """Extend the lease; False when it is no longer ours (expired, or taken over)."""
        with self._redis_errors():
            return bool(self._renew(keys=[self._key("lease", key)], args=[lease.value(), self.lease_ms]))

    def publish(self, key: str, lease: Holder) -> bool:
        """Name our copy as `key`'s, only while the lease is still ours (fencing); then drop the lease."""
        with self._redis_errors():
            keys = [self._key("lease", key), self._key("ready", key)]
            return bool(self._publish(keys=keys, args=[lease.value(), lease.token]))

    def release(self, key: str, lease: Holder) -> None:
        """Give the lease up (a failed download), if it is still ours."""
        with self._redis_errors():
            self._release(keys=[self._key("lease", key)], args=[lease.value()])

    def forget(self, key: str, copy: Holder) -> None:
        """Drop `ready` if it still names `copy` (its replica cannot serve it any more)."""
        with self._redis_errors():
            self._release(keys=[self._key("ready", key)], args=[copy.value()])

    @contextmanager
    def renewing(self, key: str, lease: Holder) -> Iterator[threading.Event]:
        """Renew the lease every third of its expiry while the block runs.

        Yields an Event that is set once a renewal finds the lease gone (the download
        may go on, but its publish will be refused).
        """
        lost, stop = threading.Event(), threading.Event()

        def run() -> None:
            while not stop.wait(self.lease_ms / 3000):
                try:
                    if not self.renew(key, lease):
                        lost.set()
                        logger.warning("lease on %s (token %d) lost: another replica may download it", key, lease.token)
                        return
                except Unavailable as e:
                    logger.warning("cannot renew the lease on %s: %s", key, e)

        thread = threading.Thread(target=run, daemon=True, name="weightserve-lease")
        thread.start()
        try:
            yield lost
        finally:
            stop.set()
            thread.join()

    def wait(self, key: str, timeout: float, poll: float = 0.1) -> Holder | None:
        """Wait until `key` is published or nobody holds its lease; the published copy, or None."""
        deadline = time.monotonic() + timeout
        while True:
            ready = self.ready(key)
            if ready is not None or self.holder(key) is None or time.monotonic() >= deadline:
                return ready
            time.sleep(poll)
