"""A version's identity is its content, so a fetch never resumes across two replicas' different "version N".

Replicas number versions on their own: one that took a publish while the owner was away,
or an owner that lost its state dir, can hold a "version 1" with other bytes than its
neighbour's. Revisions carry a digest of the version's content (`REV+vN.DIGEST`), so a
stream resumed on such a neighbour is refused (FAILED_PRECONDITION) instead of mixing the
two; replicas whose version 1 is the same bytes share one manifest and fail over as ever.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch

from tests.fleet.test_failover import PATIENT
from tests.integration.faultkit import MID_MODEL, Background, FaultProxy, ServerProcess, load_checkpoint
from weightserve.client import WeightClient
from weightserve.client.common import ShardArgs
from weightserve.client.fleet import FleetClient
from weightserve.errors import FetchError

CHUNK = 65536

pytestmark = pytest.mark.timeout(120)


def _shifted(checkpoint: dict[str, torch.Tensor], by: float) -> dict[str, torch.Tensor]:
    return {name: (t.float() + by).to(t.dtype) for name, t in checkpoint.items()}


def _own_state_dirs(tmp_path: Path) -> Callable[[int, int], list[str]]:
    return lambda index, port: ["--state-dir", str(tmp_path / f"state-{index}")]


@pytest.mark.fault(
    "a replica whose version N is other weights",
    expect="a stream resumed there is FAILED_PRECONDITION, never a state dict mixing the two",
    cases=2,
)
def test_a_fetch_never_resumes_onto_another_replicas_different_version(
    tmp_path: Path,
    mid_root: Path,
    fleet: Callable[..., list[ServerProcess]],
    proxies: Callable[[list[ServerProcess]], list[FaultProxy]],
) -> None:
    servers = fleet(2, mid_root, "--chunk-bytes", str(CHUNK), each=_own_state_dirs(tmp_path))
    checkpoint = load_checkpoint(mid_root / MID_MODEL)
    for server, by in zip(servers, (1.0, -1.0), strict=True):  # each replica its own "version 1"
        with WeightClient(server.address) as one:
            assert one.publish(MID_MODEL, _shifted(checkpoint, by)) == 1
    revisions = set()
    for server in servers:
        with WeightClient(server.address) as one:
            revisions.add(one.get_manifest(MID_MODEL, version=1).revision)
    assert len(revisions) == 2, f"two different version 1s share a revision: {revisions}"

    # The pinned revision of one replica's version 1, asked of the other: refused.
    with WeightClient(servers[0].address) as first, WeightClient(servers[1].address) as second:
        pinned = first.get_manifest(MID_MODEL, version=1).revision
        with pytest.raises(FetchError) as refused:
            second.get_manifest(MID_MODEL, revision=pinned)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value

    # The same through a fleet whose owner dies mid-stream: an error, not a mix.
    links = proxies(servers)
    addresses = [link.address for link in links]
    by_address = {link.address: (server, link) for server, link in zip(servers, links, strict=True)}
    with WeightClient(addresses, retry=PATIENT, replicas_per_model=1, connect_timeout=2.0) as probe:
        assert isinstance(probe, FleetClient)
        order = probe.fetch_order(ShardArgs(MID_MODEL))
        total = probe.get_manifest(MID_MODEL, version=1).total_bytes
    owner, owner_link = by_address[order[0]]
    owner_link.pause_after(owner_link.s2c_bytes + total // 2)

    def fetch() -> dict[str, torch.Tensor]:
        with WeightClient(addresses, retry=PATIENT, replicas_per_model=1, connect_timeout=2.0) as client:
            return client.fetch_state_dict(MID_MODEL, version=1)

    background = Background(fetch)
    assert owner_link.paused.wait(30), f"the stream never got half way\n{owner.log()}"
    owner.kill()
    owner_link.sever()
    owner_link.resume()
    with pytest.raises(FetchError) as failed:
        background.result(timeout=60)
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION, failed.value
    assert "other weights" in str(failed.value)


def test_replicas_whose_version_is_the_same_bytes_share_its_revision(
    tmp_path: Path, mid_root: Path, fleet: Callable[..., list[ServerProcess]]
) -> None:
    servers = fleet(2, mid_root, each=_own_state_dirs(tmp_path))
    changed = _shifted(load_checkpoint(mid_root / MID_MODEL), 1.0)
    manifests = []
    for server in servers:
        with WeightClient(server.address) as one:
            one.publish(MID_MODEL, changed)
            manifests.append(one.get_manifest(MID_MODEL, version=1))
    assert manifests[0].revision == manifests[1].revision
    assert manifests[0].manifest_id == manifests[1].manifest_id
    with WeightClient(servers[1].address) as second:
        fetched = second.fetch_state_dict(MID_MODEL, revision=manifests[0].revision)
    assert all(fetched[name].equal(tensor) for name, tensor in changed.items())
