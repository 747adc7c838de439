"""Replica fill between TLS replicas: the peer channel checks the headless Service's name, and under
mTLS shows the replica's own certificate, which must carry clientAuth.

Two coordinated servers (in this process, so both read the peer settings from the
environment as a pod's replicas do) share a real redis-server and the counting S3
origin. Replica A downloads the model; replica B then asks for it and either copies it
from A over the TLS peer channel (its `replica` fill counter says so, and the origin sends
no weights again) or, when the peer channel is refused, downloads it from the origin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.fleet.conftest import BUCKET
from tests.fleet.test_fleet_metrics import Samples, scrape, value
from tests.integration.faultkit import FaultProxy, assert_bit_identical, free_port, load_checkpoint
from weightserve.client import WeightClient
from weightserve.config import ServerConfig
from weightserve.server.replica_fill import CA_ENV, REPLICA_SERVER_NAME_ENV
from weightserve.testing import BackgroundServer, Pair, make_ca, make_leaf

SERVICE = "weightserve-headless.weightserve.svc.cluster.local"
"""The headless Service the replicas' certificates name: no IP, no localhost (replicas are dialled by IP)."""
MODEL = f"s3://{BUCKET}/org/mid"

pytestmark = pytest.mark.timeout(120)


@dataclass
class Replica:
    server: BackgroundServer

    @property
    def address(self) -> str:
        return self.server.address

    def metrics(self) -> Samples:
        assert self.server.server is not None and self.server.server.side is not None
        return scrape(self.server.server.side.address)


@dataclass
class Fleet:
    ca: Pair
    ca_file: Path
    worker: Pair | None
    """The workers' client certificate under mTLS."""
    replicas: list[Replica]

    def fetch(self, replica: Replica) -> dict[str, torch.Tensor]:
        client_cert: dict[str, bytes] = {}
        if self.worker is not None:
            client_cert = {"certificate_chain": self.worker.cert, "private_key": self.worker.key}
        with WeightClient(
            replica.address, timeout=60, root_certificates=self.ca.cert, server_name=SERVICE, **client_cert
        ) as client:
            return client.fetch_state_dict(MODEL)


@pytest.fixture
def tls_pair(
    tmp_path: Path, redis_url: str, s3_origin: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Fleet]]:
    """`tls_pair(mtls, replica_client_auth, server_name)`: two coordinated TLS replicas, A and B."""
    stack = ExitStack()

    def start(*, mtls: bool, replica_client_auth: bool = True, server_name: str | None = SERVICE) -> Fleet:
        ca = make_ca()
        ca_file = tmp_path / "ca.crt"
        ca_file.write_bytes(ca.cert)
        replica_pair = make_leaf(ca, SERVICE, dns=(SERVICE, f"*.{SERVICE}"), ips=(), also_client=replica_client_auth)
        cert, key = replica_pair.write(tmp_path, "replica")
        monkeypatch.setenv(CA_ENV, str(ca_file))
        if server_name is None:
            monkeypatch.delenv(REPLICA_SERVER_NAME_ENV, raising=False)
        else:
            monkeypatch.setenv(REPLICA_SERVER_NAME_ENV, server_name)
        (tmp_path / "roots").mkdir(exist_ok=True)
        replicas = []
        for name in ("a", "b"):
            port = free_port()
            config = ServerConfig(
                model_roots=(tmp_path / "roots",), listen=f"127.0.0.1:{port}", metrics_listen="127.0.0.1:0",
                allow_source=(f"s3://{BUCKET}/*",), disk_cache_dir=tmp_path / f"disk-{name}",
                coordination=redis_url, advertise=f"127.0.0.1:{port}", tls_cert=cert, tls_key=key,
                tls_client_ca=ca_file if mtls else None,
            )  # fmt: skip
            replicas.append(Replica(stack.enter_context(BackgroundServer(config))))
        worker = make_leaf(ca, "worker-0", client=True) if mtls else None
        return Fleet(ca, ca_file, worker, replicas)

    with stack:
        yield start


def _a_then_b(fleet: Fleet, s3_origin: FaultProxy, published: tuple[Path, int]) -> int:
    """A fetches (and downloads) the model, then B; the bytes the origin sent during B's fetch."""
    local, _ = published
    want = load_checkpoint(local)
    a, b = fleet.replicas
    assert_bit_identical(fleet.fetch(a), want)
    assert value(a.metrics(), "weightserve_fleet_fills_total", source="origin") == 1
    before = s3_origin.s2c_bytes
    assert_bit_identical(fleet.fetch(b), want)
    return s3_origin.s2c_bytes - before


@pytest.mark.parametrize("mtls", [False, True], ids=["tls", "mtls"])
def test_a_replica_fills_from_another_over_tls_naming_the_headless_service(
    tls_pair: Callable[..., Fleet], s3_origin: FaultProxy, published: tuple[Path, int], mtls: bool
) -> None:
    fleet = tls_pair(mtls=mtls)
    origin_during_b = _a_then_b(fleet, s3_origin, published)
    a, b = fleet.replicas
    got = b.metrics()
    assert value(got, "weightserve_fleet_fills_total", source="replica") == 1
    assert value(got, "weightserve_fleet_fills_total", source="origin") == 0
    sent = value(a.metrics(), "weightserve_replica_fill_sent_bytes_total")
    assert sent == value(got, "weightserve_fleet_fill_bytes_total", source="replica") > 0
    assert origin_during_b < published[1], "B read the weights from the origin, not from A"


def test_under_mtls_a_replica_certificate_without_client_auth_cannot_fill(
    tls_pair: Callable[..., Fleet], s3_origin: FaultProxy, published: tuple[Path, int]
) -> None:
    fleet = tls_pair(mtls=True, replica_client_auth=False)
    origin_during_b = _a_then_b(fleet, s3_origin, published)
    a, b = fleet.replicas
    assert value(b.metrics(), "weightserve_fleet_fills_total", source="replica") == 0
    assert value(b.metrics(), "weightserve_fleet_fills_total", source="origin") == 1
    assert value(a.metrics(), "weightserve_replica_fill_sent_bytes_total") == 0
    assert origin_during_b >= published[1], "B fell back to its own origin download"


def test_without_the_service_name_the_peer_channel_refuses_the_replicas_certificate(
    tls_pair: Callable[..., Fleet], s3_origin: FaultProxy, published: tuple[Path, int]
) -> None:
    fleet = tls_pair(mtls=False, server_name=None)  # the peer is then checked against its IP, which the cert lacks
    origin_during_b = _a_then_b(fleet, s3_origin, published)
    a, b = fleet.replicas
    assert value(b.metrics(), "weightserve_fleet_fills_total", source="replica") == 0
    assert value(a.metrics(), "weightserve_replica_fill_sent_bytes_total") == 0
    assert origin_during_b >= published[1]
