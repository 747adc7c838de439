"""An update whose owner dies mid-stream never rolls the caller's weights back.

`update(since_version=N)` goes to the model's owner, where the versions live. When the
owner dies, the delta fails over to a replica without that state, which the fleet client
answers by fetching the full share there instead; a replica whose latest is older than N
(often the checkpoint itself, version 0) must not have its weights applied as the update.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch

from tests.fleet.test_failover import PATIENT
from tests.integration.faultkit import MID_MODEL, Background, FaultProxy, ServerProcess, load_checkpoint
from weightserve.client import AsyncWeightClient, WeightClient
from weightserve.client.common import ShardArgs
from weightserve.errors import FetchError

CHUNK = 65536

pytestmark = pytest.mark.timeout(120)


def _shifted(checkpoint: dict[str, torch.Tensor], by: float) -> dict[str, torch.Tensor]:
    return {name: (t.float() + by).to(t.dtype) for name, t in checkpoint.items()}


@pytest.mark.fault(
    "an update's owner killed mid-stream, the next replica without its versions",
    expect="FAILED_PRECONDITION naming the older version; the targets keep since_version's weights",
    cases=2,
)
@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_an_update_failing_over_to_an_older_replica_refuses_instead_of_rolling_back(
    flavour: str,
    tmp_path: Path,
    mid_root: Path,
    fleet: Callable[..., list[ServerProcess]],
    proxies: Callable[[list[ServerProcess]], list[FaultProxy]],
) -> None:
    servers = fleet(
        2, mid_root, "--chunk-bytes", str(CHUNK), each=lambda i, port: ["--state-dir", str(tmp_path / f"state-{i}")]
    )
    links = proxies(servers)
    addresses = [link.address for link in links]
    by_address = {link.address: (server, link) for server, link in zip(servers, links, strict=True)}
    checkpoint = load_checkpoint(mid_root / MID_MODEL)
    with WeightClient(addresses, retry=PATIENT, replicas_per_model=1, connect_timeout=2.0) as client:
        assert client.publish(MID_MODEL, _shifted(checkpoint, 1.0)) == 1  # on the owner only
        held = client.fetch_state_dict(MID_MODEL, version=1)
        assert client.publish(MID_MODEL, _shifted(checkpoint, 2.0)) == 2
        delta_bytes = client.get_manifest(MID_MODEL, since_version=1).total_bytes
        owner_address = client.fetch_order(ShardArgs(MID_MODEL, since_version=1))[0]
    before = {name: t.clone() for name, t in held.items()}
    owner, owner_link = by_address[owner_address]
    owner_link.pause_after(owner_link.s2c_bytes + delta_bytes // 2)

    def update() -> int:
        if flavour == "sync":
            with WeightClient(addresses, retry=PATIENT, replicas_per_model=1, connect_timeout=2.0) as client:
                return client.update(held, MID_MODEL, since_version=1)

        async def run() -> int:
            async with AsyncWeightClient(addresses, retry=PATIENT, replicas_per_model=1, connect_timeout=2.0) as client:
                return await client.update(held, MID_MODEL, since_version=1)

        return asyncio.run(run())

    background = Background(update)
    assert owner_link.paused.wait(30), f"the delta never got half way\n{owner.log()}"
    owner.kill()
    owner_link.sever()
    owner_link.resume()
    with pytest.raises(FetchError) as refused:
        background.result(timeout=60)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value
    assert "older than since_version=1" in str(refused.value)
    for name, tensor in held.items():
        assert torch.equal(tensor, before[name]), f"{name} changed: the update rolled the weights back"
