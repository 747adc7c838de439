"""Per-replica channels under TLS verify the Service name; a dns:/// target becomes a fleet."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.integration.faultkit import MID_LLAMA, MID_MODEL, assert_bit_identical, load_checkpoint
from weightserve.client.fleet import FleetClient
from weightserve.config import ServerConfig
from weightserve.errors import FetchError
from weightserve.testing import BackgroundServer, make_ca, make_leaf, write_llama_checkpoint

SERVICE = "weightserve-headless.models.svc.cluster.local"

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_llama_checkpoint(root / MID_MODEL, MID_LLAMA, num_files=2)
    return root


@pytest.fixture
def tls_fleet(root: Path, tmp_path: Path) -> Iterator[tuple[list[str], bytes]]:
    """Two TLS servers whose certificate names only the headless Service (no IP, no localhost)."""
    ca = make_ca()
    cert, key = make_leaf(ca, SERVICE, dns=(SERVICE, f"*.{SERVICE}"), ips=()).write(tmp_path, "server")
    config = ServerConfig(model_roots=(root,), listen="127.0.0.1:0", metrics_listen="off", tls_cert=cert, tls_key=key)
    with ExitStack() as stack:
        servers = [stack.enter_context(BackgroundServer(config)) for _ in range(2)]
        yield [s.address for s in servers], ca.cert


def test_tls_replicas_dialled_by_ip_are_verified_against_the_service_name(
    tls_fleet: tuple[list[str], bytes], root: Path
) -> None:
    addresses, ca = tls_fleet
    with FleetClient(addresses, root_certificates=ca, server_name=SERVICE) as client:
        state = client.fetch_state_dict(MID_MODEL)
        assert client.last_fetch_stats is not None
        assert client.last_fetch_stats.replica in addresses
    assert_bit_identical(state, load_checkpoint(root / MID_MODEL))


def test_without_the_service_name_the_ip_does_not_match_the_certificate(tls_fleet: tuple[list[str], bytes]) -> None:
    addresses, ca = tls_fleet
    with (
        FleetClient(addresses, root_certificates=ca, connect_timeout=1.0) as client,
        pytest.raises(FetchError) as failed,
    ):
        client.list_models()
    assert "UNAVAILABLE" in str(failed.value.code())


def test_a_dns_target_resolves_to_replicas_and_routes_over_them(root: Path) -> None:
    with BackgroundServer(ServerConfig(model_roots=(root,), listen="127.0.0.1:0", metrics_listen="off")) as server:
        port = server.address.rsplit(":", 1)[1]
        with FleetClient(f"dns:///localhost:{port}", connect_timeout=1.0) as client:
            assert f"127.0.0.1:{port}" in client.endpoints()
            state = client.fetch_state_dict(MID_MODEL)
            assert client.last_fetch_stats is not None
            assert client.last_fetch_stats.replica == f"127.0.0.1:{port}"
    assert_bit_identical(state, load_checkpoint(root / MID_MODEL))
