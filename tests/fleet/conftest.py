"""Fixtures for fleet tests: several `weightserve serve` processes on loopback, started together."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.integration.faultkit import MID_LLAMA, MID_MODEL, Background, FaultProxy, ServerProcess, free_port
from weightserve.testing import write_llama_checkpoint

START_SECONDS = 90.0
"""How long each of a fleet's servers may take to say SERVING when they start together."""
BUCKET = "fleet"
"""The bucket of the S3 origin's model (`published`): s3://fleet/org/mid."""


@pytest.fixture
def mid_root(tmp_path: Path) -> Path:
    """A model root with org/mid-llama (two safetensors files)."""
    root = tmp_path / "models"
    write_llama_checkpoint(root / MID_MODEL, MID_LLAMA, num_files=2)
    return root


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Callable[..., list[ServerProcess]]]:
    """`fleet(n, root, *cli_args, each=None)`: n servers started at once on free ports; killed after the test.

    `each(index, port)` gives a server's own extra arguments (its disk cache, its address).
    """
    made: list[ServerProcess] = []

    def start(
        n: int, root: Path, *args: str, each: Callable[[int, int], list[str]] | None = None
    ) -> list[ServerProcess]:
        ports = [free_port() for _ in range(n)]
        servers = [
            ServerProcess(root, port, tmp_path, *args, *(each(i, port) if each else [])) for i, port in enumerate(ports)
        ]
        made.extend(servers)
        # n servers importing torch at once on a shared 2-core machine can take a while each
        starting = [Background(partial(server.start, START_SECONDS)) for server in servers]
        for call in starting:
            call.result(timeout=START_SECONDS + 30)
        return servers

    yield start
    for server in made:
        server.stop()


@pytest.fixture
def proxies() -> Iterator[Callable[[list[ServerProcess]], list[FaultProxy]]]:
    """`proxies(servers)`: a FaultProxy in front of each server, closed after the test."""
    made: list[FaultProxy] = []

    def start(servers: list[ServerProcess]) -> list[FaultProxy]:
        links = [FaultProxy(server.port) for server in servers]
        made.extend(links)
        return links

    yield start
    for link in made:
        link.close()


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A fresh redis-server on a free loopback port (Debian's; `make test` installs it where allowed)."""
    pytest.importorskip("redis", reason="the redis client is missing: pip install -e '.[dev]' (or '.[fleet]')")
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (make test-deps installs it as root with apt-get)")
    port = free_port()
    cmd = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"redis-server did not start (exit {proc.poll()})") from None
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def s3_origin(monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """moto's S3 server behind a FaultProxy whose s2c_bytes count what the origin sent.

    The AWS variables point server processes started afterwards at the proxy.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    proxy = FaultProxy(int(port))
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://{proxy.address}")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    try:
        yield proxy
    finally:
        proxy.close()
        server.stop()


@pytest.fixture
def published(tmp_path: Path, s3_origin: FaultProxy) -> tuple[Path, int]:
    """The tiny Llama uploaded to s3://fleet/org/mid; its local copy and its weight bytes."""
    import boto3

    local = tmp_path / "origin"
    write_llama_checkpoint(local, MID_LLAMA, num_files=2)
    s3 = boto3.client("s3", endpoint_url=f"http://{s3_origin.address}", region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    for path in sorted(local.iterdir()):
        s3.put_object(Bucket=BUCKET, Key=f"org/mid/{path.name}", Body=path.read_bytes())
    return local, sum(p.stat().st_size for p in local.glob("*.safetensors"))
