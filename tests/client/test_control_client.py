"""The clients' ControlService calls against a real server on a Mixtral-shaped checkpoint.

Waits are woken by the server (a mapping arriving on the watch stream), never by sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch

from tests.server.test_experts import EXPERTS, LAYERS, MODEL, GatedPolicy, root
from weightserve import AsyncWeightClient, FetchError, WeightClient
from weightserve.eplb.policies.base import POLICIES
from weightserve.errors import InvalidRequestError
from weightserve.v1 import weightserve_pb2 as pb

__all__ = ["root"]  # the module-scoped MoE checkpoint fixture, shared with tests/server/test_experts.py

HOT = [[1000, 900, 5, 5, 5, 5, 5, 5], [5, 5, 5, 5, 5, 5, 800, 700]]
TOPOLOGY = {"num_nodes": 1, "gpus_per_node": 4}


@pytest.fixture
def client(root, serve) -> Iterator[WeightClient]:  # type: ignore[no-untyped-def]
    with WeightClient(serve(root).address, timeout=30) as c:
        yield c


def published(client: WeightClient, job_id: str) -> pb.ExpertMapping:
    """The mapping the job publishes, as the watch stream delivers it (the job must succeed)."""
    job = client.get_rebalance(job_id)
    for mapping in client.watch_mapping(job.model, timeout=30):
        job = client.get_rebalance(job_id)
        if job.state != pb.JOB_STATE_RUNNING:
            assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
            if mapping.version == job.mapping.version:
                return mapping
    raise AssertionError("the watch stream ended")


def test_report_expert_load_takes_tensors_arrays_and_lists(client: WeightClient) -> None:
    assert client.report_expert_load(MODEL, torch.tensor(HOT, dtype=torch.int32)) == 1
    assert client.report_expert_load(MODEL, np.array(HOT, dtype=np.int64)) == 2
    assert client.report_expert_load(MODEL, HOT) == 3


def test_a_resent_report_with_its_rank_and_sequence_counts_once(client: WeightClient) -> None:
    first = client.report_expert_load(MODEL, HOT, ep_rank=3, sequence=100)
    assert client.report_expert_load(MODEL, HOT, ep_rank=3, sequence=100) == first  # the answer was lost: resent
    assert client.report_expert_load(MODEL, HOT, ep_rank=3, sequence=101) == first + 1
    assert client.report_expert_load(MODEL, HOT) == first + 2  # unnamed reports always count


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ([1] * EXPERTS, r"2-D \[moe_layers, experts\]; got shape \[8\]"),
        (torch.ones(1, LAYERS, EXPERTS, dtype=torch.int64), r"got shape \[1, 2, 8\]"),
        (torch.ones(LAYERS, EXPERTS), "integer token counts; got dtype torch.float32"),
        (np.ones((LAYERS, EXPERTS), dtype=bool), "integer token counts; got dtype torch.bool"),
        ([[1] * EXPERTS, [1] * (EXPERTS - 1)], "table of integers"),
    ],
)
def test_a_table_that_is_not_2d_integers_is_refused_before_sending(
    client: WeightClient, counts: object, message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message) as info:
        client.report_expert_load(MODEL, counts)
    assert isinstance(info.value, ValueError)


def test_a_table_of_the_wrong_shape_for_the_model_is_invalid_argument(client: WeightClient) -> None:
    with pytest.raises(FetchError) as info:
        client.report_expert_load(MODEL, [[1] * (EXPERTS - 1)] * LAYERS)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{EXPERTS} experts" in info.value.details()


def test_rebalance_succeeds_and_watch_mapping_yields_the_new_version(client: WeightClient) -> None:
    client.report_expert_load(MODEL, HOT)
    job_id = client.rebalance(MODEL, num_replicas=12, **TOPOLOGY)
    assert isinstance(job_id, str) and job_id

    first = published(client, job_id)
    job = client.get_rebalance(job_id)
    assert (job.job_id, job.model, job.state) == (job_id, MODEL, pb.JOB_STATE_SUCCEEDED)
    assert (first.num_layers, first.num_logical, first.num_physical) == (LAYERS, EXPERTS, 12)
    assert list(first.phy2log) == list(job.mapping.phy2log)
    assert job.balancedness_after > job.balancedness_before
    assert [d.ep_rank for d in job.deltas] == [0, 1, 2, 3]

    second_id = client.rebalance(MODEL, policy="greedy")  # topology and slots kept from the first
    watch = client.watch_mapping(MODEL, after_version=first.version, timeout=30)
    second = next(watch)  # only versions newer than the first
    watch.close()
    assert second.version > first.version and second.num_physical == 12
    assert client.get_rebalance(second_id).mapping.version == second.version


def test_a_worker_started_with_redundant_slots_fetches_only_what_moved(client: WeightClient) -> None:
    start = client.get_manifest(MODEL, ep_rank=0, ep_size=4, num_redundant_experts=4)  # 12 slots, 3 per rank
    assert start.experts.mapping_version == 0
    assert [len(layer.logical_experts) for layer in start.experts.layers] == [3] * LAYERS
    client.report_expert_load(MODEL, HOT)
    job_id = client.rebalance(MODEL, num_replicas=12, **TOPOLOGY)
    published(client, job_id)

    moved = 0
    for rank in range(4):
        delta = client.fetch_state_dict(MODEL, ep_rank=rank, ep_size=4, num_redundant_experts=4, since_mapping=0)
        assert all(".experts." in name for name in delta)  # no other tensors
        moved += len(delta) // 3  # w1, w2, w3 per slot
    assert moved == sum(d.experts for d in client.get_rebalance(job_id).deltas) > 0


def test_num_groups_without_a_topology_is_refused(client: WeightClient) -> None:
    with pytest.raises(InvalidRequestError, match="num_groups=2 needs num_nodes or gpus_per_node"):
        client.rebalance(MODEL, num_groups=2)


def test_joining_a_running_job_returns_its_id_and_warns(client: WeightClient, caplog: pytest.LogCaptureFixture) -> None:
    GatedPolicy.gate.clear()
    with POLICIES.registered("gated-client-test", GatedPolicy):
        client.report_expert_load(MODEL, HOT)
        first = client.rebalance(MODEL, policy="gated-client-test", **TOPOLOGY)
        try:
            with caplog.at_level(logging.WARNING, logger="weightserve.client.control"):
                second = client.rebalance(MODEL, policy="greedy", **TOPOLOGY)
            assert second == first
            assert client.get_rebalance(first).state == pb.JOB_STATE_RUNNING
        finally:
            GatedPolicy.gate.set()
        assert published(client, first).version > 0
    assert f"returning its job {first}" in caplog.text and "keeps the policy" in caplog.text


def test_unknown_job_is_a_not_found_fetch_error(client: WeightClient) -> None:
    with pytest.raises(FetchError) as info:
        client.get_rebalance("feedface")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "feedface" in str(info.value)


def test_async_client_reports_rebalances_and_watches(root, serve) -> None:  # type: ignore[no-untyped-def]
    address = serve(root).address

    async def main() -> tuple[int, pb.GetRebalanceResponse, pb.ExpertMapping]:
        async with AsyncWeightClient(address, timeout=30) as c:
            reports = await c.report_expert_load(MODEL, torch.tensor(HOT))
            job_id = await c.rebalance(MODEL, num_replicas=8, **TOPOLOGY)
            async with contextlib.aclosing(c.watch_mapping(MODEL, timeout=30)) as mappings:
                async for mapping in mappings:  # woken by each published version
                    job = await c.get_rebalance(job_id)
                    if job.state != pb.JOB_STATE_RUNNING and mapping.version == job.mapping.version:
                        return reports, job, mapping
            raise AssertionError("the watch stream ended")

    reports, job, mapping = asyncio.run(main())
    assert reports == 1
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    assert mapping.num_physical == 8 and list(mapping.phy2log) == list(job.mapping.phy2log)


def test_async_errors_are_fetch_errors(root, serve) -> None:  # type: ignore[no-untyped-def]
    address = serve(root).address
    errors: list[Exception] = []

    async def main() -> None:
        async with AsyncWeightClient(address, timeout=30) as c:
            for call in (
                lambda: c.get_rebalance("feedface"),
                lambda: c.report_expert_load(MODEL, [1, 2, 3]),
                lambda: c.report_expert_load("org/nope", HOT),
            ):
                try:
                    await call()
                except (FetchError, InvalidRequestError) as e:
                    errors.append(e)

    asyncio.run(main())
    not_found, flat, unknown = errors
    assert isinstance(not_found, FetchError) and not_found.code() == grpc.StatusCode.NOT_FOUND
    assert isinstance(flat, InvalidRequestError) and "got shape [3]" in str(flat)
    assert isinstance(unknown, FetchError) and unknown.code() == grpc.StatusCode.NOT_FOUND


def test_unary_calls_wait_for_the_server_until_their_deadline() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with WeightClient(f"127.0.0.1:{port}", timeout=0.3) as c, pytest.raises(FetchError) as info:
        c.list_models()
    # waiting for a ready channel ends at the deadline, not at the first refused connection
    # (that would be "list models: UNAVAILABLE"); a probe then says why it never connected
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert str(info.value).startswith(f"cannot reach 127.0.0.1:{port}: ") and "refused" in str(info.value)
