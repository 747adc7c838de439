"""Bounded streams: limits per peer and overall, a cut for streams that stall, memory given back.

A client that stops reading holds its stream's read-ahead and, under a memory budget,
its window; without bounds 200 such streams took 2.4 GB (2.0 GB stayed after they were
cancelled) and 51 of them locked every other client out of a 512 MiB budget.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from tests.integration.faultkit import (
    MID_MODEL,
    Background,
    FaultProxy,
    assert_bit_identical,
    free_port,
    load_checkpoint,
    wait_until,
)
from weightserve.client import WeightClient
from weightserve.testing import BackgroundServer, LlamaShape, write_llama_checkpoint
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc

CHUNK = 65536
pytestmark = pytest.mark.timeout(90)


def stalled_stream(address: str, manifest_id: str) -> Iterator[bytes]:
    """A FetchShard that has taken one message and reads no more (a 64 KiB receive window)."""
    channel = grpc.insecure_channel(address, options=[("grpc.http2.bdp_probe", 0)])
    call = pb_grpc.WeightServiceStub(channel).FetchShard(
        pb.FetchShardRequest(shard=pb.ShardSpec(model=MID_MODEL), manifest_id=manifest_id)
    )
    next(call)
    return call


@pytest.mark.fault("streams over the per-peer or overall limit")
def test_a_peer_over_its_limit_is_refused_with_a_retry_hint_and_stalls_are_cut(mid_root: Path, serve) -> None:  # type: ignore[no-untyped-def]
    server: BackgroundServer = serve(mid_root, chunk_bytes=CHUNK, max_streams_per_peer=2, stream_idle_seconds=1.0)
    gate = server.server.gate
    with WeightClient(server.address) as client:
        manifest = client.get_manifest(MID_MODEL)
    held = [stalled_stream(server.address, manifest.manifest_id) for _ in range(2)]
    try:
        with pytest.raises(grpc.RpcError) as info:
            stalled_stream(server.address, manifest.manifest_id)
        error = info.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 streams from ipv4:127.0.0.1 of at most 2 (--max-streams-per-peer)" in error.details()
        hint = dict(error.trailing_metadata() or ())
        assert int(hint["retry-after-ms"]) > 0
        # the two stalled streams make no progress: the server cuts both, and the peer may fetch again
        wait_until(lambda: gate.active == 0, 30, "the stalled streams to be cut")
        assert gate.stalled == 2 and gate.refused == 1
        with WeightClient(server.address) as client:
            assert_bit_identical(client.fetch_state_dict(MID_MODEL), load_checkpoint(mid_root / MID_MODEL))
    finally:
        for call in held:
            call.cancel()


@pytest.mark.fault("streams over the per-peer or overall limit")
def test_the_overall_limit_holds_across_peers(mid_root: Path, serve) -> None:  # type: ignore[no-untyped-def]
    server = serve(mid_root, chunk_bytes=CHUNK, max_streams=1)
    with WeightClient(server.address) as client:
        manifest = client.get_manifest(MID_MODEL)
    held = stalled_stream(server.address, manifest.manifest_id)
    try:
        with pytest.raises(grpc.RpcError) as info:
            stalled_stream(server.address, manifest.manifest_id)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "(--max-streams)" in info.value.details()
    finally:
        held.cancel()


@pytest.mark.fault("client that stops reading mid-stream")
def test_a_client_that_pauses_longer_than_the_idle_time_resumes_and_gets_every_bit(
    mid_root: Path,
    serve,  # type: ignore[no-untyped-def]
    proxy: Callable[..., FaultProxy],
    slow_client: Callable[[str], WeightClient],
) -> None:
    server = serve(mid_root, chunk_bytes=CHUNK, stream_idle_seconds=0.5)
    link = proxy(server.server.port)
    with slow_client(link.address) as client:
        link.pause_after(256 * 1024)
        fetch = Background(lambda: client.fetch_state_dict(MID_MODEL))
        assert link.paused.wait(30), "the stream never started"
        wait_until(lambda: server.server.gate.stalled >= 1, 30, "the server to cut the paused stream")
        link.resume()
        state = fetch.result(timeout=60)
        assert client.last_stats is not None and client.last_stats.reconnects >= 1
    assert_bit_identical(state, load_checkpoint(mid_root / MID_MODEL))


WIDE = LlamaShape(hidden_size=1024, intermediate_size=2816, num_hidden_layers=1, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=4096)  # fmt: skip
SERVE = "import sys; from weightserve.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.fault("client that stops reading mid-stream")
def test_the_memory_of_cancelled_streams_is_given_back(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_llama_checkpoint(root / MID_MODEL, WIDE, num_files=1)  # 4 MiB chunks: each stream holds ~12 MB
    port = free_port()
    argv = [sys.executable, "-c", SERVE, "serve", "--model-root", str(root), "--listen", f"127.0.0.1:{port}"]
    argv += ["--grace-seconds", "1", "--metrics-listen", "off"]  # parallel tests must not share port 9400
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    try:
        address = f"127.0.0.1:{port}"
        with WeightClient(address, timeout=60) as client:
            manifest = client.get_manifest(MID_MODEL)
        server = psutil.Process(proc.pid)
        idle = server.memory_info().rss
        calls = [stalled_stream(address, manifest.manifest_id) for _ in range(16)]
        wait_until(lambda: server.memory_info().rss - idle > 16 * 4 << 20, 30, "the streams to hold their chunks")
        held = server.memory_info().rss - idle
        for call in calls:
            call.cancel()
        # the trim after the streams end gives back (nearly) all they held
        wait_until(lambda: server.memory_info().rss - idle < held / 4, 30, "the memory to be given back")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@pytest.mark.fault("streams over the per-peer or overall limit")
def test_unix_socket_peers_are_limited_per_process(mid_root: Path, tmp_path: Path) -> None:
    from weightserve.config import ServerConfig

    socket_path = tmp_path / "ws.sock"
    config = ServerConfig(
        model_roots=(mid_root,),
        listen=f"unix:{socket_path}",
        chunk_bytes=CHUNK,
        max_streams_per_peer=1,
        metrics_listen="off",
    )
    with BackgroundServer(config) as server, WeightClient(f"unix:{socket_path}") as client:
        manifest = client.get_manifest(MID_MODEL)
        request = pb.FetchShardRequest(shard=pb.ShardSpec(model=MID_MODEL), manifest_id=manifest.manifest_id)
        held = client._fetch(request)  # the client's own channel: it names this process
        next(iter(held))
        try:
            assert dict(server.server.gate.by_peer) == {f"unix:pid={os.getpid()}": 1}
            second = client._fetch(request)
            with pytest.raises(grpc.RpcError) as info:
                next(iter(second))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"from unix:pid={os.getpid()} of at most 1" in info.value.details()
            # another process on the same socket is another peer
            other = subprocess.run(
                [sys.executable, "-c", OTHER_PROCESS, f"unix:{socket_path}", MID_MODEL],
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            assert other.returncode == 0, other.stderr
        finally:
            held.cancel()


OTHER_PROCESS = """
import sys
from weightserve.client import WeightClient
with WeightClient(sys.argv[1]) as client:
    assert client.fetch_state_dict(sys.argv[2])
"""
