"""A fetch survives the server being SIGKILLed and restarted, and fetches only what it lacked.

The server runs as `weightserve serve` in a child process; the client dials it through
a FaultProxy that holds the stream half way, so the kill lands mid-stream at a known
point. The restarted server listens on the same port, so the client's channel finds
it again on its own.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from tests.integration.faultkit import (
    MID_LLAMA,
    MID_MODEL,
    Background,
    FaultProxy,
    ServerProcess,
    assert_bit_identical,
    load_checkpoint,
    wait_until,
)
from weightserve.client import AsyncWeightClient, FetchStats, WeightClient
from weightserve.client.retry import RetryPolicy
from weightserve.errors import FetchError
from weightserve.testing import write_llama_checkpoint

CHUNK = 65536
FRAMING_SLACK = 128
"""Bytes of TensorChunk framing per message beyond its payload (tags, offsets, crcs, the header's name)."""
PATIENT = RetryPolicy(initial_backoff=0.05, max_backoff=0.25, retry_deadline=60)
"""Retries for long enough (a minute) to outlast a server restart on a slow machine."""
QUICK_BACKOFF = dict(initial_backoff=0.01, max_backoff=0.02)
"""Backoff so short that the old bound (10 attempts) gave up within 0.2 s of a break."""
RESTART_GAP = 2.0
"""How long the server stays away: ten times what 10 attempts of QUICK_BACKOFF outlasted."""

pytestmark = pytest.mark.timeout(90)


def _stream_halted_by_kill(
    server: ServerProcess, proxy: FaultProxy, client: WeightClient
) -> tuple[Background, int, int]:
    """Start a fetch, hold it half way, SIGKILL the server and drop the connection.

    Returns the running fetch, the plan's total bytes and the payload bytes the client
    had verified when its stream broke.
    """
    total = client.get_manifest(MID_MODEL).total_bytes
    proxy.pause_after(proxy.s2c_bytes + total // 2)
    fetch = Background(lambda: client.fetch_state_dict(MID_MODEL))
    assert proxy.paused.wait(30), f"the stream never got half way\n{server.log()}"
    server.kill()
    proxy.sever()
    proxy.resume()
    # The client has now consumed every byte it will get from the dead server; once it
    # has noticed the break, its count is exactly what it verified before the kill.
    wait_until(
        lambda: client.last_stats is not None and client.last_stats.reconnects >= 1,
        20,
        "the client to see the break",
    )
    assert not fetch.done(), "the fetch ended while the server was down"
    assert client.last_stats is not None
    verified = client.last_stats.payload_bytes
    assert 0 < verified < total, "the kill did not land mid-stream"
    return fetch, total, verified


@pytest.mark.fault("server SIGKILLed mid-stream and restarted")
def test_fetch_resumes_after_sigkill_and_restart(
    mid_root: Path, server_process: Callable[..., ServerProcess], proxy: Callable[..., FaultProxy]
) -> None:
    server = server_process(mid_root, "--chunk-bytes", str(CHUNK)).start()
    link = proxy(server.port)
    with WeightClient(link.address, retry=PATIENT) as client:
        manifest = client.get_manifest(MID_MODEL)
        fetch, total, verified = _stream_halted_by_kill(server, link, client)
        server.start()  # same port: the client's retries find it
        state = fetch.result(timeout=60)
        stats = client.last_stats

    assert_bit_identical(state, load_checkpoint(mid_root / MID_MODEL))  # type: ignore[arg-type]
    assert stats is not None
    assert stats.reconnects >= 1
    assert stats.payload_bytes == total, "some payload bytes were accepted twice"
    remaining = total - verified
    messages = sum(max(1, math.ceil(t.nbytes / CHUNK)) for t in manifest.tensors)
    bound = remaining + CHUNK + FRAMING_SLACK * messages
    assert stats.bytes_after_reconnect <= bound, (
        f"after the restart the client received {stats.bytes_after_reconnect} bytes for the "
        f"{remaining} payload bytes it lacked (bound {bound}): it did not resume where it stopped"
    )
    assert stats.bytes_after_reconnect >= remaining


@pytest.mark.fault("model changed while a fetch was broken")
def test_resume_after_model_changed_is_failed_precondition(
    mid_root: Path, server_process: Callable[..., ServerProcess], proxy: Callable[..., FaultProxy]
) -> None:
    server = server_process(mid_root, "--chunk-bytes", str(CHUNK)).start()
    link = proxy(server.port)
    with WeightClient(link.address, retry=PATIENT) as client:
        fetch, _, _ = _stream_halted_by_kill(server, link, client)
        write_llama_checkpoint(mid_root / MID_MODEL, MID_LLAMA, num_files=2, seed=1)  # new weights, same shapes
        server.start()
        with pytest.raises(FetchError) as caught:
            fetch.result(timeout=60)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value
        assert "changed" in str(caught.value), caught.value

        fresh = client.fetch_state_dict(MID_MODEL)  # a new fetch gets the new weights whole
    assert_bit_identical(fresh, load_checkpoint(mid_root / MID_MODEL))


def _fetch_in_background(
    flavour: str, address: str, policy: RetryPolicy
) -> tuple[Background, Callable[[], FetchStats]]:
    """Start fetch_state_dict of MID_MODEL with the sync or asyncio client on a thread.

    Returns the running fetch and a function that reads its live stats.
    """
    clients: list[WeightClient | AsyncWeightClient] = []

    async def fetch_async() -> object:
        async with AsyncWeightClient(address, retry=policy) as client:
            clients.append(client)
            return await client.fetch_state_dict(MID_MODEL)

    def fetch_sync() -> object:
        with WeightClient(address, retry=policy) as client:
            clients.append(client)
            return client.fetch_state_dict(MID_MODEL)

    fetch = Background(fetch_sync if flavour == "sync" else lambda: asyncio.run(fetch_async()))

    def stats() -> FetchStats:
        stats = clients[0].last_stats if clients else None
        return stats if stats is not None else FetchStats()

    return fetch, stats


def _kill_mid_stream(
    server: ServerProcess, proxy: FaultProxy, flavour: str, policy: RetryPolicy
) -> tuple[Background, Callable[[], FetchStats]]:
    """Like _stream_halted_by_kill, for either client: the fetch is left waiting for a dead server."""
    with WeightClient(proxy.address) as probe:
        total = probe.get_manifest(MID_MODEL).total_bytes
    proxy.pause_after(proxy.s2c_bytes + total // 2)
    fetch, stats = _fetch_in_background(flavour, proxy.address, policy)
    assert proxy.paused.wait(30), f"the stream never got half way\n{server.log()}"
    server.kill()
    proxy.sever()
    proxy.resume()
    wait_until(lambda: stats().reconnects >= 1, 20, "the client to see the break")
    assert not fetch.done(), "the fetch ended while the server was down"
    return fetch, stats


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_fetch_waits_out_a_restart_longer_than_attempt_counts_allowed(
    mid_root: Path, server_process: Callable[..., ServerProcess], proxy: Callable[..., FaultProxy], flavour: str
) -> None:
    server = server_process(mid_root, "--chunk-bytes", str(CHUNK)).start()
    link = proxy(server.port)
    fetch, stats = _kill_mid_stream(server, link, flavour, RetryPolicy(**QUICK_BACKOFF, retry_deadline=60))
    restart = server.start_after(RESTART_GAP)
    state = fetch.result(timeout=60)
    restart.result(timeout=30)

    assert_bit_identical(state, load_checkpoint(mid_root / MID_MODEL))  # type: ignore[arg-type]
    assert stats().retry_wait_seconds >= RESTART_GAP
    # It waited for the channel instead of spinning: QUICK_BACKOFF alone would have made
    # a hundred attempts in the gap.
    assert stats().attempts <= 4, stats()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_retry_deadline_ends_a_fetch_to_a_server_that_never_comes_back(
    mid_root: Path, server_process: Callable[..., ServerProcess], proxy: Callable[..., FaultProxy], flavour: str
) -> None:
    deadline = 3.0
    server = server_process(mid_root, "--chunk-bytes", str(CHUNK)).start()
    link = proxy(server.port)
    fetch, stats = _kill_mid_stream(server, link, flavour, RetryPolicy(**QUICK_BACKOFF, retry_deadline=deadline))
    with pytest.raises(FetchError) as caught:
        fetch.result(timeout=deadline + 10)

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
    assert "gave up after waiting" in str(caught.value) and "retry_deadline 3s" in str(caught.value)
    assert deadline <= stats().retry_wait_seconds < deadline + 2
