"""The fleet's Prometheus series after real coordinated downloads: fills by source, lease waits, takeovers.

Replicas share one real redis-server and one counting S3 origin (tests/fleet/conftest.py).
The origin is paused half way through the first download until every other replica is
counted as waiting, so each series has one exact value; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fleet.conftest import BUCKET
from tests.fleet.test_one_origin_download import _fetch_everywhere, _redis
from tests.integration.faultkit import (
    FaultProxy,
    ServerProcess,
    assert_bit_identical,
    free_port,
    load_checkpoint,
    wait_until,
)
from weightserve.storage.coordination import Holder

pytestmark = pytest.mark.timeout(180)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _replicas(
    fleet: Callable[..., list[ServerProcess]], tmp_path: Path, n: int, redis_url: str, *extra: str
) -> tuple[list[ServerProcess], dict[str, str]]:
    """n coordinated replicas, each with its own disk cache and metrics port; and address -> metrics address."""
    empty = tmp_path / "roots"
    empty.mkdir(exist_ok=True)
    metrics: dict[str, str] = {}

    def each(i: int, port: int) -> list[str]:
        metrics[f"127.0.0.1:{port}"] = side = f"127.0.0.1:{free_port()}"
        return [
            *("--disk-cache-dir", str(tmp_path / f"disk-{i}"), "--advertise", f"127.0.0.1:{port}"),
            *("--metrics-listen", side),  # after the fixture's own 127.0.0.1:0, so this one wins
        ]

    servers = fleet(n, empty, "--allow-source", f"s3://{BUCKET}/*", "--coordination", redis_url, *extra, each=each)
    return servers, metrics


def scrape(side: str) -> Samples:
    with urllib.request.urlopen(f"http://{side}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def total(sides: list[str], name: str, **labels: str) -> float:
    return sum(value(scrape(side), name, **labels) for side in sides)


def _copy_bytes(disk: Path) -> int:
    """The bytes of the one model published in a replica's S3 disk cache (its marker's count)."""
    (marker,) = disk.glob("s3/*/entry.json")
    return int(json.loads(marker.read_text())["bytes"])


def test_one_download_and_the_fills_from_it_are_counted_by_source(
    redis_url: str,
    s3_origin: FaultProxy,
    published: tuple[Path, int],
    fleet: Callable[..., list[ServerProcess]],
    tmp_path: Path,
) -> None:
    local, weight_bytes = published
    servers, metrics = _replicas(fleet, tmp_path, 3, redis_url)
    sides = list(metrics.values())
    for side in sides:  # both sources at 0 before any fill, so origin over all is defined from the start
        assert value(scrape(side), "weightserve_fleet_fills_total", source="origin") == 0
        assert value(scrape(side), "weightserve_fleet_fill_bytes_total", source="replica") == 0

    s3_origin.hold_links_after(weight_bytes // 8)  # the download held midway; the others' listings still pass
    calls = _fetch_everywhere(servers)
    assert s3_origin.paused.wait(30), "the download never got under way"
    wait_until(lambda: total(sides, "weightserve_fleet_lease_waits_total") == 2, 30, "both others waiting")
    s3_origin.resume()
    want = load_checkpoint(local)
    for call in calls:
        assert_bit_identical(call.result(timeout=100), want)  # type: ignore[arg-type]

    db = _redis(redis_url)
    leader = Holder.parse(db.get(next(db.scan_iter("weightserve:ready:*"))))
    index = {server.address: i for i, server in enumerate(servers)}
    model_bytes = _copy_bytes(tmp_path / f"disk-{index[leader.address]}")
    assert model_bytes > weight_bytes  # the weights and the config and index files beside them
    for server in servers:
        got = scrape(metrics[server.address])
        is_leader = int(server.address == leader.address)
        assert _copy_bytes(tmp_path / f"disk-{index[server.address]}") == model_bytes
        assert value(got, "weightserve_fleet_fills_total", source="origin") == is_leader
        assert value(got, "weightserve_fleet_fills_total", source="replica") == (1 - is_leader)
        assert value(got, "weightserve_fleet_fill_bytes_total", source="origin") == model_bytes * is_leader
        assert value(got, "weightserve_fleet_fill_bytes_total", source="replica") == model_bytes * (1 - is_leader)
        assert value(got, "weightserve_fleet_lease_waits_total") == (1 - is_leader)
        assert value(got, "weightserve_fleet_lease_wait_seconds_count") == (1 - is_leader)
        assert value(got, "weightserve_replica_fill_sent_bytes_total") == 2 * model_bytes * is_leader
        assert value(got, "weightserve_fleet_lease_takeovers_total") == 0
        assert value(got, "weightserve_fleet_leases_lost_total") == 0
        assert value(got, "weightserve_fleet_uncoordinated_downloads_total") == 0
    # what an operator divides: origin bytes over all bytes the fleet's disk caches took
    origin = total(sides, "weightserve_fleet_fill_bytes_total", source="origin")
    assert origin / total(sides, "weightserve_fleet_fill_bytes_total") == pytest.approx(1 / 3)


@pytest.mark.fault(
    "the leaseholder SIGKILLed mid-download",
    expect="another replica takes the lease with a newer token; the partial copy is never published",
)
def test_a_takeover_after_the_leaseholder_dies_is_counted(
    redis_url: str,
    s3_origin: FaultProxy,
    published: tuple[Path, int],
    fleet: Callable[..., list[ServerProcess]],
    tmp_path: Path,
) -> None:
    local, weight_bytes = published
    servers, metrics = _replicas(fleet, tmp_path, 3, redis_url, "--lease-seconds", "1")
    s3_origin.hold_links_after(weight_bytes // 8)  # the download held midway; the others' listings still pass
    calls = _fetch_everywhere(servers)
    assert s3_origin.paused.wait(30), "the download never got under way"
    db = _redis(redis_url)
    wait_until(lambda: any(db.scan_iter("weightserve:lease:*")), 10, "a lease to be taken")
    holder = Holder.parse(db.get(next(db.scan_iter("weightserve:lease:*"))))
    survivors = [s for s in servers if s.address != holder.address]
    sides = [metrics[s.address] for s in survivors]
    wait_until(lambda: total(sides, "weightserve_fleet_lease_waits_total") == 2, 30, "both others waiting")
    victim = next(s for s in servers if s.address == holder.address)
    victim.kill()
    s3_origin.resume()

    want = load_checkpoint(local)
    for server, call in zip(servers, calls, strict=True):
        if server is not victim:
            assert_bit_identical(call.result(timeout=100), want)  # type: ignore[arg-type]
    assert total(sides, "weightserve_fleet_lease_takeovers_total") == 1
    assert total(sides, "weightserve_fleet_fills_total", source="origin") == 1
    assert total(sides, "weightserve_fleet_fills_total", source="replica") == 1
    assert total(sides, "weightserve_fleet_lease_waits_total") == 2
    assert total(sides, "weightserve_fleet_leases_lost_total") == 0


def test_without_redis_the_uncoordinated_download_is_counted(
    s3_origin: FaultProxy,
    published: tuple[Path, int],
    fleet: Callable[..., list[ServerProcess]],
    tmp_path: Path,
) -> None:
    local, _ = published
    servers, metrics = _replicas(fleet, tmp_path, 1, f"redis://127.0.0.1:{free_port()}/0")
    (call,) = _fetch_everywhere(servers)
    assert_bit_identical(call.result(timeout=100), load_checkpoint(local))  # type: ignore[arg-type]
    got = scrape(metrics[servers[0].address])
    assert value(got, "weightserve_fleet_uncoordinated_downloads_total") == 1
    assert value(got, "weightserve_fleet_fills_total", source="origin") == 1
    assert value(got, "weightserve_fleet_fill_bytes_total", source="origin") == _copy_bytes(tmp_path / "disk-0")
