"""A stream that stops moving is given up and resumed, not waited on for ever.

Between the client and a real server sits a relay that passes every call through but can
hold a FetchShard stream still after some messages: a live server whose stream stopped
(keepalive sees nothing wrong). The client must cut it after stream_idle_timeout and
resume from its last verified byte; before a stream's first message nothing is timed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch

from tests.client.test_client import MODEL, assert_bitwise_equal, reference
from weightserve import AsyncWeightClient, FetchError, WeightClient
from weightserve.client import FetchStats, RetryPolicy
from weightserve.client.common import fetch_args
from weightserve.client.stalls import StalledStream, StallWatch
from weightserve.testing import LlamaShape, write_llama_checkpoint

SERVICE = "weightserve.v1.WeightService"
SHAPE = LlamaShape(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1, vocab_size=64)  # fmt: skip
HEALTH = "grpc.health.v1.Health"


@dataclass
class Relay:
    """Passes calls to `upstream`; the first `hold_streams` FetchShard streams stop after `hold_after` messages."""

    upstream: str
    hold_after: int = 3
    hold_streams: int = 1
    delay_first: float = 0.0
    """Seconds the first stream waits before its first message (a cold model loading)."""
    streams: int = 0
    released: threading.Event = field(default_factory=threading.Event)
    address: str = ""

    def start(self) -> grpc.Server:
        channel = grpc.insecure_channel(self.upstream)

        def unary(method: str, service: str = SERVICE) -> grpc.RpcMethodHandler:
            call = channel.unary_unary(f"/{service}/{method}")
            return grpc.unary_unary_rpc_method_handler(lambda request, context: call(request))

        def stream(method: str) -> grpc.RpcMethodHandler:
            call = channel.unary_stream(f"/{SERVICE}/{method}")

            def relay(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
                self.streams += 1
                held = self.streams <= self.hold_streams
                if self.streams == 1 and self.delay_first:
                    time.sleep(self.delay_first)
                for sent, message in enumerate(call(request)):
                    if held and sent == self.hold_after:
                        self.released.wait(30)  # still connected, sending nothing
                        return
                    yield message

            return grpc.unary_stream_rpc_method_handler(relay)

        handlers = {"GetManifest": unary("GetManifest"), "ListModels": unary("ListModels"),
                    "FetchShard": stream("FetchShard"), "FetchFiles": stream("FetchFiles")}  # fmt: skip
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        health = {"Check": unary("Check", HEALTH)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),
                                         grpc.method_handlers_generic_handler(HEALTH, health)))  # fmt: skip
        self.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        server.start()
        return server


@pytest.fixture
def relay(model_root: Path, serve) -> Iterator[Callable[..., Relay]]:
    upstream = serve(model_root, chunk_bytes=4096).address
    started: list[tuple[Relay, grpc.Server]] = []

    def start(**options: object) -> Relay:
        relay = Relay(upstream, **options)  # type: ignore[arg-type]
        started.append((relay, relay.start()))
        return relay

    yield start
    for relay, server in started:
        relay.released.set()
        server.stop(None)


POLICY = RetryPolicy(stream_idle_timeout=0.5, initial_backoff=0.01, max_backoff=0.05)


@pytest.mark.fault(
    "a stream that stops moving mid-fetch (server alive)",
    expect="cut after stream_idle_timeout, resumed; bit-identical",
)
def test_a_stalled_stream_is_resumed(model_root: Path, relay: Callable[..., Relay]) -> None:
    stalling = relay()
    with WeightClient(stalling.address, retry=POLICY) as client:
        state = client.fetch_state_dict(MODEL)
        stats = client.last_fetch_stats
    assert_bitwise_equal(state, reference(model_root / MODEL))
    assert stats is not None and stats.reconnects == 1 and stalling.streams == 2


@pytest.mark.fault(
    "a stream that stops moving mid-fetch, asyncio client",
    expect="cut after stream_idle_timeout, resumed; bit-identical",
)
def test_a_stalled_stream_is_resumed_by_the_asyncio_client(model_root: Path, relay: Callable[..., Relay]) -> None:
    stalling = relay()

    async def fetch() -> tuple[dict[str, torch.Tensor], int]:
        async with AsyncWeightClient(stalling.address, retry=POLICY) as client:
            state = await client.fetch_state_dict(MODEL)
            assert client.last_fetch_stats is not None
            return state, client.last_fetch_stats.reconnects

    state, reconnects = asyncio.run(fetch())
    assert_bitwise_equal(state, reference(model_root / MODEL))
    assert reconnects == 1 and stalling.streams == 2


def test_nothing_is_timed_before_a_streams_first_message(model_root: Path, relay: Callable[..., Relay]) -> None:
    slow_start = relay(hold_streams=0, delay_first=1.5)  # three timeouts before the first chunk
    with WeightClient(slow_start.address, retry=POLICY) as client:
        state = client.fetch_state_dict(MODEL)
        stats = client.last_fetch_stats
    assert_bitwise_equal(state, reference(model_root / MODEL))
    assert stats is not None and stats.reconnects == 0 and slow_start.streams == 1


def test_a_stream_that_always_stalls_gives_up_within_the_retry_deadline(relay: Callable[..., Relay]) -> None:
    always = relay(hold_streams=1000)
    policy = RetryPolicy(stream_idle_timeout=0.3, initial_backoff=0.01, max_backoff=0.05, max_attempts=3)
    with WeightClient(always.address, retry=policy) as client, pytest.raises(Exception) as info:
        client.fetch_state_dict(MODEL)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    assert "stream_idle_timeout" in str(info.value) and always.streams == 3


def test_the_watch_cancels_only_after_progress_then_silence() -> None:
    progress = [0]
    cancelled = threading.Event()

    class Stream:
        def cancel(self) -> None:
            cancelled.set()

    with StallWatch(0.2, lambda: progress[0]) as watch:
        with watch.watching(Stream()):
            assert not cancelled.wait(0.6)  # nothing received yet: not timed
            for _ in range(6):  # moving: not stalled
                progress[0] += 1
                assert not cancelled.wait(0.08)
            assert cancelled.wait(1.0)  # then still
        assert isinstance(watch.explain(grpc.RpcError()), StalledStream)


def test_a_policy_refuses_a_timeout_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="stream_idle_timeout"):
        RetryPolicy(stream_idle_timeout=0)
    RetryPolicy(stream_idle_timeout=None)  # waits for ever, as before


@pytest.mark.fault(
    "a fleet replica whose stream stops moving",
    expect="cut after stream_idle_timeout; the fetch resumes on the next replica",
)
@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_a_fleet_fails_over_from_a_stalled_replica(model_root: Path, relay: Callable[..., Relay], flavour: str) -> None:
    relays = {r.address: r for r in (relay(hold_streams=0), relay(hold_streams=0))}
    options = {"retry": POLICY, "replicas_per_model": 1, "connect_timeout": 2.0}
    with WeightClient(list(relays), **options) as probe:
        owner = probe.fetch_order(fetch_args(MODEL, 0, 1, {}).shard)[0]  # type: ignore[attr-defined]
    relays[owner].hold_streams = 1000  # the owner stalls every stream it sends
    if flavour == "sync":
        with WeightClient(list(relays), **options) as client:
            state, stats = client.fetch_state_dict(MODEL), client.last_fetch_stats
    else:

        async def fetch() -> tuple[dict[str, torch.Tensor], FetchStats | None]:
            async with AsyncWeightClient(list(relays), **options) as client:
                return await client.fetch_state_dict(MODEL), client.last_fetch_stats

        state, stats = asyncio.run(fetch())
    assert_bitwise_equal(state, reference(model_root / MODEL))
    assert stats is not None and stats.reconnects == 1
    assert [r.streams for r in relays.values()] == [1, 1]  # one stalled on the owner, the rest on the other


@pytest.mark.fault(
    "a file stream that stops moving", expect="DEADLINE_EXCEEDED after stream_idle_timeout; no partial file"
)
@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_a_stalled_file_stream_fails_and_leaves_no_partial_file(tmp_path: Path, serve, flavour: str) -> None:
    root = tmp_path / "models"
    write_llama_checkpoint(root / MODEL, SHAPE)
    (root / MODEL / "tokenizer.json").write_bytes(bytes(range(256)) * 64)  # 16 KiB: several chunks
    stalling = Relay(serve(root, chunk_bytes=4096).address, hold_after=2)
    server = stalling.start()
    dest = tmp_path / "out"
    try:
        if flavour == "sync":
            with WeightClient(stalling.address, retry=POLICY) as client, pytest.raises(FetchError) as info:
                client.fetch_files(MODEL, dest)
        else:

            async def fetch() -> None:
                async with AsyncWeightClient(stalling.address, retry=POLICY) as client:
                    await client.fetch_files(MODEL, dest)

            with pytest.raises(FetchError) as info:
                asyncio.run(fetch())
    finally:
        stalling.released.set()
        server.stop(None)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "stream_idle_timeout" in str(info.value)
    assert not [p for p in dest.rglob("*") if p.is_file() and p.name.startswith("tokenizer")]
