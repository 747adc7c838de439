"""SIGTERM drains: streams in flight finish, new calls are refused, the process exits 0 in time."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from tests.integration.faultkit import (
    MID_MODEL,
    Background,
    FaultProxy,
    ServerProcess,
    assert_bit_identical,
    health_status,
    load_checkpoint,
    wait_until,
)
from weightserve.client import WeightClient
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc

GRACE = 20.0

pytestmark = pytest.mark.timeout(60)


def _list_models_code(address: str) -> grpc.StatusCode:
    """ListModels on a new connection: OK, or why not."""
    with grpc.insecure_channel(address) as channel:
        try:
            pb_grpc.WeightServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=2)
        except grpc.RpcError as e:
            return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.mark.fault("SIGTERM with a stream in flight")
def test_sigterm_drains_streams_in_flight(
    mid_root: Path,
    server_process: Callable[..., ServerProcess],
    proxy: Callable[..., FaultProxy],
    slow_client: Callable[[str], WeightClient],
) -> None:
    server = server_process(mid_root, "--chunk-bytes", "65536", "--grace-seconds", str(GRACE)).start()
    assert server.proc is not None
    link = proxy(server.port)
    with slow_client(link.address) as client:
        total = client.get_manifest(MID_MODEL).total_bytes
        link.pause_after(link.s2c_bytes + total // 4)
        fetch = Background(lambda: client.fetch_state_dict(MID_MODEL))
        assert link.paused.wait(30), f"the stream never started\n{server.log()}"

        terminated = time.monotonic()
        server.terminate()
        wait_until(
            lambda: _list_models_code(server.address) == grpc.StatusCode.UNAVAILABLE,
            10,
            "new calls to be refused after SIGTERM",
        )
        assert health_status(server.address) in (
            health_pb2.HealthCheckResponse.NOT_SERVING,
            grpc.StatusCode.UNAVAILABLE,
        )
        assert server.proc.poll() is None, f"the server exited with a stream in flight\n{server.log()}"

        link.resume()
        state = fetch.result(timeout=GRACE)
        stats = client.last_stats

    assert stats is not None
    assert stats.reconnects == 0, "the stream in flight was cut and resumed instead of drained"
    assert_bit_identical(state, load_checkpoint(mid_root / MID_MODEL))  # type: ignore[arg-type]
    rc = server.proc.wait(timeout=GRACE)
    elapsed = time.monotonic() - terminated
    assert rc == 0, server.log()
    assert elapsed < GRACE, f"exit took {elapsed:.1f}s, past the {GRACE}s grace period"
    log = server.log()
    events = [log.find(line) for line in ("draining", "FetchShard org/mid-llama", "stopped")]
    assert -1 not in events and events == sorted(events), f"expected drain, stream end, stop in order:\n{log}"


@pytest.mark.fault("SIGTERM with a stream in flight")
def test_a_drain_that_outlasts_the_grace_logs_no_errors(
    mid_root: Path, server_process: Callable[..., ServerProcess], proxy: Callable[..., FaultProxy]
) -> None:
    """Streams still running when the grace period ends are cut quietly: no tracebacks, no
    "generator didn't stop" from the handlers that grpc cancels, exit code 0."""
    server = server_process(mid_root, "--chunk-bytes", "65536", "--grace-seconds", "1").start()
    assert server.proc is not None
    link = proxy(server.port)
    with WeightClient(link.address) as client:
        link.pause_after(link.s2c_bytes + client.get_manifest(MID_MODEL).total_bytes // 4)
        fetch = Background(lambda: client.fetch_state_dict(MID_MODEL))
        assert link.paused.wait(30), f"the stream never started\n{server.log()}"
        server.terminate()
        rc = server.proc.wait(timeout=30)
        link.resume()
    # the client is closed: its fetch, whose server is gone, ends instead of retrying
    with pytest.raises(Exception):  # noqa: B017 - the cut stream's fetch fails one way or another
        fetch.result(timeout=60)
    log = server.log()
    assert rc == 0, log
    for bad in ("Traceback", "ERROR", "didn't stop", "never retrieved"):
        assert bad not in log, f"{bad!r} in the server's log:\n{log}"
