"""A fetch over a fleet of real server processes survives a replica SIGKILLed mid-stream.

Each server runs as `weightserve serve` in a child process behind a FaultProxy; the
proxy of the replica the fetch starts on holds the stream half way, so the kill lands
mid-stream at a known point. The fetch must finish on the next replica in the model's
rendezvous order, under the same manifest id, fetching again at most the one chunk it
had not verified.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.faultkit import (
    MID_MODEL,
    Background,
    FaultProxy,
    ServerProcess,
    assert_bit_identical,
    load_checkpoint,
)
from weightserve.cli import main
from weightserve.client import AsyncWeightClient, FetchStats, WeightClient
from weightserve.client.common import ShardArgs
from weightserve.client.fleet import FleetClient
from weightserve.client.fleet_aio import AsyncFleetClient
from weightserve.client.retry import RetryPolicy

CHUNK = 65536
FRAMING_SLACK = 128
"""Bytes of TensorChunk framing per message beyond its payload."""
PATIENT = RetryPolicy(initial_backoff=0.05, max_backoff=0.25, retry_deadline=60)

pytestmark = pytest.mark.timeout(120)


def _fleet_client(addresses: list[str]) -> FleetClient:
    client = WeightClient(addresses, retry=PATIENT, replicas_per_model=1, connect_timeout=2.0)
    assert isinstance(client, FleetClient)
    return client


def _fetch(flavour: str, addresses: list[str], model: str) -> tuple[dict[str, Any], FetchStats | None]:
    """A fetch through a fleet by the sync or the asyncio client; the state dict and its stats."""
    if flavour == "sync":
        with _fleet_client(addresses) as client:
            return client.fetch_state_dict(model), client.last_fetch_stats

    async def run() -> tuple[dict[str, Any], FetchStats | None]:
        async with AsyncWeightClient(addresses, retry=PATIENT, replicas_per_model=1, connect_timeout=2.0) as client:
            assert isinstance(client, AsyncFleetClient)
            return await client.fetch_state_dict(model), client.last_fetch_stats

    return asyncio.run(run())


@pytest.mark.fault(
    "a replica SIGKILLed mid-stream",
    expect="the fetch resumes on the next replica in hash order, same manifest, at most one chunk again; bit-identical",
)
@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_fetch_fails_over_to_the_next_replica_when_one_is_killed_mid_stream(
    flavour: str,
    mid_root: Path,
    fleet: Callable[..., list[ServerProcess]],
    proxies: Callable[[list[ServerProcess]], list[FaultProxy]],
) -> None:
    servers = fleet(3, mid_root, "--chunk-bytes", str(CHUNK))
    links = proxies(servers)
    by_address = {link.address: (server, link) for server, link in zip(servers, links, strict=True)}
    addresses = [link.address for link in links]
    with _fleet_client(addresses) as probe:
        order = probe.fetch_order(ShardArgs(MID_MODEL))
        manifest = probe.get_manifest(MID_MODEL)
    total = manifest.total_bytes
    first_server, first_link = by_address[order[0]]
    first_link.pause_after(first_link.s2c_bytes + total // 2)
    fetch = Background(lambda: _fetch(flavour, addresses, MID_MODEL))
    assert first_link.paused.wait(30), f"the stream never got half way\n{first_server.log()}"
    first_server.kill()
    first_link.sever()
    first_link.resume()
    result: tuple[dict[str, Any], FetchStats | None] = fetch.result(timeout=60)  # type: ignore[assignment]
    state, stats = result

    assert_bit_identical(state, load_checkpoint(mid_root / MID_MODEL))
    assert stats is not None
    assert stats.replica == order[1], "the fetch did not resume on the next replica in hash order"
    assert stats.reconnects == 1
    assert stats.payload_bytes == total, "some payload bytes were accepted twice"
    assert 0 < stats.bytes_after_reconnect < total, "the kill did not land mid-stream"
    messages = sum(max(1, math.ceil(t.nbytes / CHUNK)) for t in manifest.tensors)
    bound = total + CHUNK + FRAMING_SLACK * (messages + 1)
    assert stats.bytes_received <= bound, (
        f"the fetch received {stats.bytes_received} bytes over both replicas for a {total}-byte plan "
        f"(bound {bound}): it fetched more than one chunk twice"
    )
    assert by_address[order[2]][1].s2c_bytes < CHUNK, "the third replica streamed although the second was up"


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_replica_dead_before_the_fetch_is_skipped_for_manifest_and_stream(
    flavour: str, mid_root: Path, fleet: Callable[..., list[ServerProcess]]
) -> None:
    servers = fleet(2, mid_root)
    addresses = [server.address for server in servers]
    with _fleet_client(addresses) as probe:
        order = probe.fetch_order(ShardArgs(MID_MODEL))
    next(s for s in servers if s.address == order[0]).kill()
    state, stats = _fetch(flavour, addresses, MID_MODEL)

    assert_bit_identical(state, load_checkpoint(mid_root / MID_MODEL))
    assert stats is not None
    assert stats.replica == order[1]
    assert stats.reconnects == 0, "the dead replica was found before any stream was opened"


def test_the_prefetch_command_warms_the_models_top_replicas(
    mid_root: Path, fleet: Callable[..., list[ServerProcess]], capsys: pytest.CaptureFixture[str]
) -> None:
    servers = fleet(3, mid_root)
    addresses = [s.address for s in servers]
    assert main(["prefetch", MID_MODEL, "--server", ",".join(addresses), "--world-size", "2", "--wait"]) == 0
    assert f"prefetched {MID_MODEL}" in capsys.readouterr().out
    with FleetClient(addresses) as client:  # replicas_per_model 2, as the command's default
        top = client.owner_order(MID_MODEL)
    warmed = {}
    for endpoint in top:
        with WeightClient(endpoint) as one:
            warmed[endpoint] = one.evict(MID_MODEL)
    assert [warmed[e] for e in top] == [True, True, False], f"prefetch warmed {warmed}"
