"""Hugging Face models are coordinated as S3's are: one replica downloads a commit from the Hub, the others
copy it from that replica.

Two coordinated servers (in this process: the fake Hub's variables are this process's)
share a real redis-server; the Hub is tests/storage's FakeHub, whose request log counts
the file downloads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.fleet.test_fleet_metrics import scrape, value
from tests.integration.faultkit import MID_LLAMA, assert_bit_identical, free_port, load_checkpoint
from tests.storage.conftest import FakeHub, fake_hub, hub_env  # noqa: F401 - the fake Hub fixtures
from weightserve.client import WeightClient
from weightserve.config import ServerConfig
from weightserve.testing import BackgroundServer, write_llama_checkpoint

REPO = "org/mid"
MODEL = f"hf://{REPO}"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def on_the_hub(hub_env: FakeHub, tmp_path: Path) -> tuple[Path, str]:  # noqa: F811 - the fixture imported above
    """The tiny Llama as a Hub repo: its local copy and its commit."""
    local = tmp_path / "origin"
    write_llama_checkpoint(local, MID_LLAMA, num_files=2)
    return local, hub_env.add(REPO, {p.name: p.read_bytes() for p in sorted(local.iterdir())})


@pytest.fixture
def replicas(tmp_path: Path, redis_url: str, hub_env: FakeHub) -> Iterator[list[BackgroundServer]]:  # noqa: F811
    (tmp_path / "roots").mkdir()
    with ExitStack() as stack:
        servers = []
        for name in ("a", "b"):
            port = free_port()
            config = ServerConfig(
                model_roots=(tmp_path / "roots",), listen=f"127.0.0.1:{port}", metrics_listen="127.0.0.1:0",
                allow_source=("hf://org/*",), disk_cache_dir=tmp_path / f"disk-{name}", coordination=redis_url,
                advertise=f"127.0.0.1:{port}",
            )  # fmt: skip
            servers.append(stack.enter_context(BackgroundServer(config)))
        yield servers


def metrics(server: BackgroundServer) -> dict:  # type: ignore[type-arg]
    assert server.server is not None and server.server.side is not None
    return scrape(server.server.side.address)


def test_a_hub_commit_is_downloaded_by_one_replica_and_copied_by_the_other(
    on_the_hub: tuple[Path, str],
    replicas: list[BackgroundServer],
    hub_env: FakeHub,  # noqa: F811
    tmp_path: Path,
) -> None:
    local, commit = on_the_hub
    want = load_checkpoint(local)
    for server in replicas:
        with WeightClient(server.address, timeout=60) as client:
            assert_bit_identical(client.fetch_state_dict(MODEL), want)

    weight_gets = [p for p in hub_env.requests("GET") if p.endswith(".safetensors")]
    assert sorted(weight_gets) == sorted(f"/{REPO}/resolve/{commit}/{p.name}" for p in local.glob("*.safetensors"))
    a, b = (metrics(server) for server in replicas)
    assert value(a, "weightserve_fleet_fills_total", source="origin") == 1
    assert value(b, "weightserve_fleet_fills_total", source="replica") == 1
    assert value(b, "weightserve_fleet_fills_total", source="origin") == 0
    assert value(a, "weightserve_replica_fill_sent_bytes_total") == value(
        b, "weightserve_fleet_fill_bytes_total", source="replica"
    )
    for name in ("a", "b"):  # each replica's copy is plain files under its fleet disk cache, no Hub metadata
        (entry,) = (tmp_path / f"disk-{name}" / "hf-fleet").glob("*/entry.json")
        files = {p.relative_to(entry.parent / "files").as_posix() for p in (entry.parent / "files").rglob("*")}
        assert files == {p.name for p in local.iterdir()}
    assert not (tmp_path / "disk-b" / "hf").exists(), "the copy did not go through the Hub cache"
