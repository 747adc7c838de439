"""The Redis lease against a real redis-server: one holder, fencing, expiry, renewal, no Redis."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.integration.faultkit import free_port
from weightserve.errors import UnavailableError
from weightserve.storage.coordination import Holder, RedisCoordinator, Unavailable
from weightserve.storage.disk_cache import DiskCache
from weightserve.storage.fleet_fill import FleetFill

KEY = "s3://bucket/llama@abc"


def test_one_replica_takes_the_lease_and_publishes_its_copy(redis_url: str) -> None:
    a, b = RedisCoordinator(redis_url, "a:1"), RedisCoordinator(redis_url, "b:1")
    lease = a.acquire(KEY)
    assert lease is not None and lease.address == "a:1"
    assert b.acquire(KEY) is None, "two replicas hold one model's lease"
    assert b.holder(KEY) == lease
    assert b.ready(KEY) is None, "a copy was named before it was published"
    assert a.publish(KEY, lease)
    assert b.ready(KEY) == lease
    assert b.holder(KEY) is None, "the lease outlived the publish"


def test_no_lease_once_another_replicas_copy_is_ready_but_our_own_copy_can_be_redone(redis_url: str) -> None:
    a, b = RedisCoordinator(redis_url, "a:1"), RedisCoordinator(redis_url, "b:1")
    lease = a.acquire(KEY)
    assert lease is not None and a.publish(KEY, lease)
    assert b.acquire(KEY) is None, "b looked before a published and would download a second copy"
    again = a.acquire(KEY)  # a lost its own copy: it may fetch it again
    assert again is not None and again.token > lease.token


def test_a_replica_whose_lease_expired_cannot_publish(redis_url: str) -> None:
    slow = RedisCoordinator(redis_url, "slow:1", lease_seconds=0.2)
    quick = RedisCoordinator(redis_url, "quick:1")
    stale = slow.acquire(KEY)
    assert stale is not None
    took_over = quick.wait(KEY, timeout=10, poll=0.05)  # the lease lapses: nobody holds it any more
    assert took_over is None
    fresh = quick.acquire(KEY)
    assert fresh is not None and fresh.token > stale.token
    assert not slow.publish(KEY, stale), "a fenced-off replica published its copy"
    assert not slow.renew(KEY, stale)
    assert quick.publish(KEY, fresh)
    assert slow.ready(KEY) == fresh


def test_an_older_token_never_replaces_a_newer_ready(redis_url: str) -> None:
    c = RedisCoordinator(redis_url, "a:1")
    old = c.acquire(KEY)
    assert old is not None
    c.release(KEY, old)
    new = c.acquire(KEY)
    assert new is not None and c.publish(KEY, new)
    c._redis.set(f"weightserve:lease:{KEY}", old.value())  # an old holder somehow holds the lease again
    assert not c.publish(KEY, old)
    assert c.ready(KEY) == new


def test_renewal_keeps_a_long_download_leased(redis_url: str) -> None:
    a = RedisCoordinator(redis_url, "a:1", lease_seconds=0.3)
    b = RedisCoordinator(redis_url, "b:1")
    lease = a.acquire(KEY)
    assert lease is not None
    with a.renewing(KEY, lease) as lost:
        waited = threading.Event()
        waited.wait(1.0)  # three lease lifetimes: without renewal the lease would have lapsed
        assert b.acquire(KEY) is None
    assert not lost.is_set()
    assert a.publish(KEY, lease)


def test_forget_drops_only_the_copy_it_names(redis_url: str) -> None:
    c = RedisCoordinator(redis_url, "a:1")
    lease = c.acquire(KEY)
    assert lease is not None and c.publish(KEY, lease)
    c.forget(KEY, Holder(lease.token + 1, "a:1"))
    assert c.ready(KEY) == lease
    c.forget(KEY, lease)
    assert c.ready(KEY) is None


def test_no_redis_is_unavailable_not_a_crash() -> None:
    c = RedisCoordinator(f"redis://127.0.0.1:{free_port()}/0", "a:1")
    with pytest.raises(Unavailable, match="redis at"):
        c.acquire(KEY)


def _origin(directory: Path) -> None:
    (directory / "w.safetensors").write_bytes(b"w" * 100)


def test_a_copy_that_cannot_be_read_is_forgotten_and_the_filler_downloads_itself(
    redis_url: str, tmp_path: Path
) -> None:
    other = RedisCoordinator(redis_url, "other:1")
    gone = other.acquire(KEY)
    assert gone is not None and other.publish(KEY, gone)
    me = RedisCoordinator(redis_url, "me:1")

    def unreachable_peer(copy: Holder, key: str, directory: Path) -> None:
        raise UnavailableError(f"{copy.address} is gone")

    fleet = FleetFill(me, unreachable_peer)
    cache = DiskCache(tmp_path / "cache")
    cache.fleet = fleet
    path = cache.populate(KEY, 100, _origin)
    assert (path / "w.safetensors").read_bytes() == b"w" * 100
    assert (fleet.origin_downloads, fleet.peer_fills) == (1, 0)
    mine = me.ready(KEY)
    assert mine is not None and mine.address == "me:1" and mine.token > gone.token
    published = cache.published_files(KEY)
    assert published is not None and published[2] == mine.token, "the copy does not carry its lease token"


def test_a_failed_origin_download_gives_the_lease_up_and_publishes_nothing(redis_url: str, tmp_path: Path) -> None:
    me = RedisCoordinator(redis_url, "me:1")

    def broken_origin(directory: Path) -> None:
        (directory / "half.safetensors").write_bytes(b"h")
        raise UnavailableError("the origin went away")

    cache = DiskCache(tmp_path / "cache")
    cache.fleet = FleetFill(me, lambda copy, key, directory: None)
    with pytest.raises(UnavailableError, match="origin went away"):
        cache.populate(KEY, 100, broken_origin)
    assert me.holder(KEY) is None, "the lease outlived the failed download"
    assert me.ready(KEY) is None
    assert cache.lookup(KEY) is None and not list(cache.root.glob("*.partial"))
