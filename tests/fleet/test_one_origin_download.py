"""One origin download per model across replicas, coordinated through a real redis-server.

Four `weightserve serve` processes, each with its own disk cache (as on four machines),
share one Redis and one S3 origin (moto behind a proxy that counts the bytes it sends).
Every replica is asked for the same remote model at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.fleet.conftest import BUCKET
from tests.integration.faultkit import (
    Background,
    FaultProxy,
    ServerProcess,
    assert_bit_identical,
    free_port,
    load_checkpoint,
)
from weightserve.client import WeightClient
from weightserve.client.retry import RetryPolicy
from weightserve.storage.coordination import Holder

MODEL = f"s3://{BUCKET}/org/mid"
HEADROOM = 64 * 1024
"""Origin bytes beyond the weights: each replica lists the prefix and reads config and index (a few KiB each)."""

pytestmark = pytest.mark.timeout(120)


def _replicas(
    fleet: Callable[..., list[ServerProcess]], tmp_path: Path, n: int, coordination: str, *extra: str
) -> list[ServerProcess]:
    empty = tmp_path / "roots"
    empty.mkdir(exist_ok=True)
    return fleet(
        n,
        empty,
        "--allow-source",
        f"s3://{BUCKET}/*",
        "--coordination",
        coordination,
        *extra,
        each=lambda i, port: ["--disk-cache-dir", str(tmp_path / f"disk-{i}"), "--advertise", f"127.0.0.1:{port}"],
    )


def _fetch_everywhere(servers: list[ServerProcess]) -> list[Background]:
    def fetch(address: str) -> Any:
        with WeightClient(address, timeout=90, retry=RetryPolicy(retry_deadline=5)) as client:
            return client.fetch_state_dict(MODEL)

    return [Background(partial(fetch, server.address)) for server in servers]


def _redis(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url)


def test_four_replicas_read_each_origin_file_once(
    redis_url: str,
    s3_origin: FaultProxy,
    published: tuple[Path, int],
    fleet: Callable[..., list[ServerProcess]],
    tmp_path: Path,
) -> None:
    local, weight_bytes = published
    servers = _replicas(fleet, tmp_path, 4, redis_url)
    before = s3_origin.s2c_bytes
    states = [call.result(timeout=100) for call in _fetch_everywhere(servers)]
    origin = s3_origin.s2c_bytes - before

    want = load_checkpoint(local)
    for state in states:
        assert_bit_identical(state, want)  # type: ignore[arg-type]
    assert weight_bytes <= origin <= weight_bytes + HEADROOM, (
        f"the origin sent {origin} bytes for {weight_bytes} bytes of weights to 4 replicas: "
        "more than one replica downloaded"
    )
    ready = [
        Holder.parse(v) for k in _redis(redis_url).scan_iter("weightserve:ready:*") if (v := _redis(redis_url).get(k))
    ]
    assert len(ready) == 1 and ready[0].address in {s.address for s in servers}
    copied = [s for s in servers if "copied s3://" in s.log()]
    assert len(copied) == 3, "three replicas should have filled from the one that downloaded"


@pytest.mark.fault(
    "the leaseholder SIGKILLed mid-download",
    expect="another replica takes the lease with a newer token; the partial copy is never published",
)
def test_a_leaseholder_killed_mid_download_loses_its_lease_and_no_partial_copy_is_served(
    redis_url: str,
    s3_origin: FaultProxy,
    published: tuple[Path, int],
    fleet: Callable[..., list[ServerProcess]],
    tmp_path: Path,
) -> None:
    local, weight_bytes = published
    servers = _replicas(fleet, tmp_path, 3, redis_url, "--lease-seconds", "1")
    s3_origin.hold_links_after(weight_bytes // 8)  # the download held midway; the others' listings still pass
    calls = _fetch_everywhere(servers)
    assert s3_origin.paused.wait(30), "the download never got under way"
    db = _redis(redis_url)
    deadline = time.monotonic() + 10
    while not (leases := list(db.scan_iter("weightserve:lease:*"))) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(leases) == 1, "no replica (or more than one) holds the download lease"
    holder = Holder.parse(db.get(leases[0]))
    victim = next(s for s in servers if s.address == holder.address)
    victim.kill()
    s3_origin.resume()

    want = load_checkpoint(local)
    survivors = [(s, c) for s, c in zip(servers, calls, strict=True) if s is not victim]
    for _, call in survivors:
        assert_bit_identical(call.result(timeout=100), want)  # type: ignore[arg-type]
    ready = Holder.parse(db.get(db.scan_iter("weightserve:ready:*").__next__()))
    assert ready.address != victim.address and ready.token > holder.token, "the dead holder's copy was named"
    victim_index = servers.index(victim)
    victim_disk = tmp_path / f"disk-{victim_index}"
    assert not list(victim_disk.glob("*/*/entry.json")), "the killed replica published a partial download"


def test_without_redis_each_replica_downloads_on_its_own_with_a_warning(
    s3_origin: FaultProxy,
    published: tuple[Path, int],
    fleet: Callable[..., list[ServerProcess]],
    tmp_path: Path,
) -> None:
    local, weight_bytes = published
    servers = _replicas(fleet, tmp_path, 2, f"redis://127.0.0.1:{free_port()}/0")
    before = s3_origin.s2c_bytes
    for call in _fetch_everywhere(servers):
        assert_bit_identical(call.result(timeout=100), load_checkpoint(local))  # type: ignore[arg-type]
    assert s3_origin.s2c_bytes - before >= 2 * weight_bytes
    for server in servers:
        assert "without coordination" in server.log()
