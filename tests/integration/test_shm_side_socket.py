"""The shared-memory side socket under pressure: descriptors running out, floods of idle
connections, an accept loop that died, a side socket that does not answer, and a file in
its way. Each ends with a fetch that still returns the checkpoint's bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from tests.integration.shmkit import ServeUnix, open_fds, wait_until
from tests.test_cli import serve_fails
from weightserve.client import AsyncWeightClient, WeightClient
from weightserve.client import shm as client_shm
from weightserve.errors import FetchError, RedeemError
from weightserve.server.side_admission import MAX_WAITING_PER_PEER
from weightserve.testing import LlamaShape, write_llama_checkpoint
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc

MODEL = "org/tiny-llama"
SHAPE = LlamaShape(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=200)  # fmt: skip
FLOOD = "side-socket connections without a ticket, or accept failing"
FLOOD_EXPECT = (
    f"over {MAX_WAITING_PER_PEER} per process (or the total cap) refused at once; a failed accept (EMFILE) "
    "logged and retried; a dead accept loop: FetchShardSegments FAILED_PRECONDITION, clients stream chunks"
)
STUCK = "side socket that does not answer"
STUCK_EXPECT = (
    "RedeemError (DEADLINE_EXCEEDED or UNAVAILABLE) within 10 s; transport='auto' streams chunks, saying so once"
)

HOLDER = """
import socket, sys, time
conns = []
for _ in range(int(sys.argv[2])):
    conns.append(socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET))
    conns[-1].connect(sys.argv[1])
time.sleep(0.5)
refused = 0
for conn in conns:
    conn.setblocking(False)
    try:
        refused += conn.recv(400).startswith(b"ERbusy")
    except BlockingIOError:
        pass
print(refused, flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_llama_checkpoint(root / MODEL, SHAPE, num_files=1)
    return root


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a)


@contextlib.contextmanager
def holder(path: Path, count: int) -> subprocess.Popen[str]:
    """Another process holding `count` side connections without a ticket; yields it once it has read its replies."""
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(count)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        yield child
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(10)


def fetched_over_shm(client: WeightClient) -> bool:
    stats = client.last_fetch_stats
    return stats is not None and stats.bytes_received == 0


@pytest.mark.fault(FLOOD, expect=FLOOD_EXPECT)
def test_the_accept_loop_outlives_running_out_of_descriptors(
    root: Path, serve_unix: ServeUnix, caplog: pytest.LogCaptureFixture
) -> None:
    server = serve_unix(root)
    assert server.server is not None and server.server.handoff is not None
    handoff = server.server.handoff
    with WeightClient(server.address) as client:
        chunks = client.fetch_state_dict(MODEL, transport="grpc")
        early = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # made while descriptors remain
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        filler: list[int] = []
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_fds() + 32, hard))
        try:
            with contextlib.suppress(OSError):
                while True:
                    filler.append(os.open(os.devnull, os.O_RDONLY))
            early.connect(str(handoff.path))  # the server's accept now fails with EMFILE
            wait_until(lambda: handoff.accept_failures >= 2, "accept failed, paused and was tried again", 5)
        finally:
            for fd in filler:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert handoff.accepting
        assert equal(client.fetch_state_dict(MODEL, transport="shm", verify=True), chunks)
        early.close()
    said = [r for r in caplog.records if "cannot accept" in r.getMessage()]
    assert len(said) == 1 and "Too many open files" in said[0].getMessage()  # throttled: one line for the burst


@pytest.mark.fault(FLOOD, expect=FLOOD_EXPECT)
def test_one_process_cannot_hold_the_side_socket_from_others(root: Path, serve_unix: ServeUnix) -> None:
    server = serve_unix(root)
    assert server.server is not None and server.server.handoff is not None
    handoff = server.server.handoff
    with WeightClient(server.address) as client, holder(handoff.path, MAX_WAITING_PER_PEER + 4) as child:
        assert child.stdout is not None and child.stdout.readline().strip() == "4"  # the 4 over its share, at once
        assert handoff.waiting.by_pid[child.pid] == MAX_WAITING_PER_PEER
        chunks = client.fetch_state_dict(MODEL, transport="grpc")
        assert equal(client.fetch_state_dict(MODEL, verify=True), chunks) and fetched_over_shm(client)
    wait_until(lambda: not handoff.waiting.by_pid, "the holder's connections no longer count")


@pytest.mark.fault(FLOOD, expect=FLOOD_EXPECT)
def test_over_the_total_cap_a_fetch_is_refused_at_once_and_streams_chunks(root: Path, serve_unix: ServeUnix) -> None:
    server = serve_unix(root)
    assert server.server is not None and server.server.handoff is not None
    handoff = server.server.handoff
    handoff.waiting.limit = 8
    with WeightClient(server.address) as client, holder(handoff.path, 12) as child:
        assert child.stdout is not None and child.stdout.readline().strip() == "4"
        chunks = client.fetch_state_dict(MODEL, transport="grpc")
        started = time.monotonic()
        assert equal(client.fetch_state_dict(MODEL, verify=True), chunks) and not fetched_over_shm(client)
        with pytest.raises(FetchError) as refused:
            client.fetch_state_dict(MODEL, transport="shm")
        assert time.monotonic() - started < 5  # refused, not waited out
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "at most 8" in str(refused.value)


@pytest.mark.fault(FLOOD, expect=FLOOD_EXPECT)
def test_a_dead_accept_loop_refuses_grants_and_both_clients_stream_chunks(
    root: Path, serve_unix: ServeUnix, caplog: pytest.LogCaptureFixture
) -> None:
    server = serve_unix(root)
    assert server.server is not None and server.server.handoff is not None
    handoff = server.server.handoff

    def broken(conn: socket.socket) -> None:
        conn.close()
        raise RuntimeError("injected: the accept loop ends")

    handoff._admit = broken  # type: ignore[method-assign]
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
        probe.connect(str(handoff.path))
        wait_until(lambda: not handoff.accepting, "the accept loop ended", 5)
    assert any("stopped accepting" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    with WeightClient(server.address) as client:
        chunks = client.fetch_state_dict(MODEL, transport="grpc")
        assert equal(client.fetch_state_dict(MODEL), chunks) and not fetched_over_shm(client)
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.WeightServiceStub(channel).FetchShardSegments(
            pb.FetchShardSegmentsRequest(shard=pb.ShardSpec(model=MODEL)), timeout=10
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "stopped accepting" in str(refused.value.details())

    async def fetch() -> dict[str, torch.Tensor]:
        async with AsyncWeightClient(server.address) as client:
            return await client.fetch_state_dict(MODEL)

    assert equal(asyncio.run(fetch()), chunks)


@pytest.mark.fault(STUCK, expect=STUCK_EXPECT, cases=2)
def test_redeem_says_deadline_exceeded_or_unavailable_never_a_bare_oserror(tmp_path: Path) -> None:
    path = str(tmp_path / "side.fds")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as never_answers:
        never_answers.bind(path)
        never_answers.listen(8)  # never accepts: what a dead accept loop leaves behind
        started = time.monotonic()
        with pytest.raises(RedeemError) as late:
            client_shm.redeem(path, b"t" * 32, 1, 0.3)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started < 3
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as other:  # accepted, then closed unanswered
            other.connect(path)
        conn, _ = never_answers.accept()
        conn.close()
        os.unlink(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as closes:
        closes.bind(path)
        closes.listen(8)
        with pytest.raises(RedeemError) as gone:
            closer = threading.Thread(target=lambda: closes.accept()[0].close())  # noqa: PLW0108
            closer.start()
            client_shm.redeem(path, b"t" * 32, 1, 5)
        closer.join()
    assert gone.value.code() == grpc.StatusCode.UNAVAILABLE
    fds = open_fds()
    with pytest.raises(RedeemError):
        client_shm.redeem(str(tmp_path / "nothing.fds"), b"t" * 32, 1, 1)
    assert open_fds() == fds


@pytest.mark.fault(STUCK, expect=STUCK_EXPECT)
def test_a_side_socket_that_never_answers_makes_both_clients_stream_chunks(
    root: Path, serve_unix: ServeUnix, caplog: pytest.LogCaptureFixture
) -> None:
    server = serve_unix(root)
    assert server.server is not None and server.server.handoff is not None
    held: list[socket.socket] = []
    server.server.handoff._admit = held.append  # type: ignore[method-assign]  # accepted, never answered
    with WeightClient(server.address, timeout=0.5) as client:
        chunks = client.fetch_state_dict(MODEL, transport="grpc")
        for _ in range(2):
            assert equal(client.fetch_state_dict(MODEL, verify=True), chunks) and not fetched_over_shm(client)
        with pytest.raises(RedeemError) as stuck:
            client.fetch_state_dict(MODEL, transport="shm")
    assert stuck.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    said = [r for r in caplog.records if r.levelno == logging.WARNING and "streaming chunks" in r.getMessage()]
    assert len(said) == 1 and "did not hand over the segments within 0.5 s" in said[0].getMessage()

    async def fetch() -> dict[str, torch.Tensor]:
        async with AsyncWeightClient(server.address, timeout=0.5) as client:
            state = await client.fetch_state_dict(MODEL)
            with pytest.raises(RedeemError):
                await client.fetch_state_dict(MODEL, transport="shm")
            return state

    assert equal(asyncio.run(fetch()), chunks)
    for conn in held:
        conn.close()


@pytest.mark.fault("bad or unknown server setting", cases=2)
def test_a_file_in_the_side_sockets_way_is_named(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    listen = tmp_path / "ws.sock"
    side = tmp_path / "ws.sock.fds"
    for kind, make in (("a regular file", side.touch), ("a directory", side.mkdir)):
        make()
        line = serve_fails(["--model-root", str(root), "--listen", f"unix:{listen}", "--metrics-listen", "off"], capsys)
        assert line == (f"--listen unix:{listen}: its shared-memory side socket {side} cannot be made: "
                        f"{kind} is in the way; remove it, or listen at another path")  # fmt: skip
        side.unlink() if kind == "a regular file" else side.rmdir()
