"""Fixtures for the integration tests: mid-sized checkpoints, proxies, server processes, Unix-socket servers."""

from __future__ import annotations

import gc
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.faultkit import MID_LLAMA, MID_MODEL, FaultProxy, ServerProcess, free_port
from tests.integration.shmkit import ServeUnix
from weightserve.client import WeightClient
from weightserve.client import sync as client_sync
from weightserve.testing import BackgroundServer, write_llama_checkpoint


@pytest.fixture
def mid_root(tmp_path: Path) -> Path:
    """A fresh model root with org/mid-llama (two safetensors files); tests may damage it."""
    root = tmp_path / "models"
    write_llama_checkpoint(root / MID_MODEL, MID_LLAMA, num_files=2)
    return root


@pytest.fixture
def proxy() -> Iterator[Callable[..., FaultProxy]]:
    """`proxy(upstream_port, corruptor=None)` starts a FaultProxy; all are closed after the test."""
    started: list[FaultProxy] = []

    def start(upstream_port: int, **kwargs: object) -> FaultProxy:
        p = FaultProxy(upstream_port, **kwargs)  # type: ignore[arg-type]
        started.append(p)
        return p

    yield start
    for p in started:
        p.close()
    errors = [e for p in started for e in p.errors]
    assert not errors, f"proxy threads failed: {errors!r}"


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """`server_process(root, *cli_args)`: an unstarted `weightserve serve` on a free loopback port.

    Whatever is still running after the test is killed.
    """
    made: list[ServerProcess] = []

    def make(root: Path, *args: str) -> ServerProcess:
        server = ServerProcess(root, free_port(), tmp_path, *args)
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


@pytest.fixture
def slow_client(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], WeightClient]:
    """WeightClients whose HTTP/2 receive window stays at its 64 KiB default (no wide window, no BDP probing).

    Such a client, held by a paused proxy, lets the server run at most a window ahead:
    with the library's 8 MiB window (RECEIVE_WINDOW), or one grown by probing, a loaded
    machine lets the server put a whole small model into the window and the kernel's
    socket buffers before the proxy pauses, and the stream never stalls.
    """
    stock = client_sync.channel_options

    def narrow() -> list[tuple[str, int]]:
        options = [(key, value) for key, value in stock() if key != "grpc.http2.lookahead_bytes"]
        return [*options, ("grpc.http2.bdp_probe", 0)]

    monkeypatch.setattr(client_sync, "channel_options", narrow)
    return WeightClient


@pytest.fixture(autouse=True)
def collect_garbage() -> Iterator[None]:
    """Run finalizers of what a test dropped (calls, streams, futures) before the next test starts.

    What they log is then attributed to the test that made them, and no finalizer runs in
    the middle of a later ast.parse: on CPython 3.11.7 and older, a traceback formatted
    there (it ast.parses source lines for its carets) raises "SystemError: AST
    constructor recursion depth mismatch" in pytest's assertion rewriter (gh-106905).
    """
    yield
    gc.collect()


@pytest.fixture
def serve_unix(serve: Callable[..., BackgroundServer], tmp_path: Path) -> ServeUnix:
    """`serve_unix(root, **config)`: a server on a Unix socket under tmp_path (so its side socket is there too)."""
    sockets = itertools.count()

    def start(root: Path, **overrides: object) -> BackgroundServer:
        listen = f"unix:{tmp_path / f'ws{next(sockets)}.sock'}"
        return serve(root, **{"listen": listen, "metrics_listen": "off", **overrides})

    return start
