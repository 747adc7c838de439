"""A fetch survives the server being SIGKILLed and restarted, and fetches only what it lacked.

The server runs as `weightserve serve` in a child process; the client dials it through
a FaultProxy that holds the stream half way, so the kill lands mid-stream at a known
point. The restarted server listens on the same port, so the client's channel finds
it again on its own.
"""

from __future__ import annotations

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
from weightserve.client import WeightClient
from weightserve.client.retry import RetryPolicy
from weightserve.errors import FetchError
from weightserve.testing import write_llama_checkpoint

CHUNK = 65536
FRAMING_SLACK = 128
"""Bytes of TensorChunk framing per message beyond its payload (tags, offsets, crcs, the header's name)."""
PATIENT = RetryPolicy(max_attempts=200, initial_backoff=0.05, max_backoff=0.25)
"""Retries for long enough (tens of seconds) to outlast a server restart on a slow machine."""

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
