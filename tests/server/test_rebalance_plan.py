"""Rebalance requests: one job per model however calls interleave, and every refusal at the call.

A request the job would refuse must be INVALID_ARGUMENT at once: a failed job counts in
weightserve_eplb_rebalances_total{outcome="failed"} and pages an operator.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from tests.server.test_experts import MODEL, GatedPolicy, control, report, wait_job
from tests.server.test_experts import root as moe_root  # noqa: F401 - the module-scoped MoE fixture
from tests.server.test_observability import scrape, value
from weightserve.eplb.policies.base import POLICIES
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(60)
LOAD = [[50, 1, 1, 1, 1, 1, 1, 40], [1, 30, 1, 1, 1, 1, 60, 1]]
CALLS = 8


def test_concurrent_rebalances_of_one_model_start_one_job(moe_root, serve) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """Calls that all arrive while the model is being reopened (after an Evict) share one job."""
    GatedPolicy.gate.clear()
    with POLICIES.registered("gated-race", GatedPolicy):
        server = serve(moe_root)
        stub = control(server.address)
        report(stub, LOAD)
        pb_grpc.WeightServiceStub(grpc.insecure_channel(server.address)).Evict(pb.EvictRequest(model=MODEL))
        request = pb.RebalanceRequest(
            model=MODEL, policy="gated-race", topology=pb.ExpertTopology(num_nodes=1, gpus_per_node=4)
        )
        try:
            with ThreadPoolExecutor(CALLS) as pool:
                answers = list(pool.map(lambda _: stub.Rebalance(request, timeout=30), range(CALLS)))
        finally:
            GatedPolicy.gate.set()
        started = [a.job_id for a in answers if not a.already_running]
        assert len(started) == 1, started
        assert {a.job_id for a in answers} == set(started)
        assert wait_job(stub, started[0]).state == pb.JOB_STATE_SUCCEEDED
        # the model's job has ended: the next call starts a new one
        again = stub.Rebalance(pb.RebalanceRequest(model=MODEL))
        assert not again.already_running and again.job_id != started[0]
        assert wait_job(stub, again.job_id).state == pb.JOB_STATE_SUCCEEDED
    assert value(scrape(server), "weightserve_eplb_rebalances_total", model=MODEL, outcome="succeeded") == 2


def _requests() -> list[pb.RebalanceRequest]:
    """Topologies, slot counts, groups and localities around the 8-expert model's limits."""
    found = []
    for nodes, per_node, groups, replicas, locality in itertools.product(
        (1, 2, 3), (1, 2, 4), (0, 1, 2, 3, 8, 9), (0, 9, 12, 16), ("group", "relaxed")
    ):
        topology = pb.ExpertTopology(num_nodes=nodes, gpus_per_node=per_node, num_groups=groups, topk_group=groups % 3)
        found.append(pb.RebalanceRequest(model=MODEL, num_replicas=replicas, topology=topology, locality=locality))
    return found


REQUESTS = _requests()


@pytest.mark.fault("request past a static or model limit", cases=len(REQUESTS))
def test_a_rebalance_the_call_accepts_never_fails_later(moe_root, serve) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    server = serve(moe_root)
    stub = control(server.address)
    report(stub, LOAD)
    refused = set()
    for request in REQUESTS:
        try:
            job_id = stub.Rebalance(request, timeout=10).job_id
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (request, e.details())
            refused.add(e.details())
            continue
        job = wait_job(stub, job_id)
        assert job.state == pb.JOB_STATE_SUCCEEDED, (request, job.error)
    assert "3 expert groups for 8 experts: the groups must divide the experts" in refused
    assert any("is not a multiple of num_gpus" in r or "do not divide over" in r for r in refused), refused
    failed = value(scrape(server), "weightserve_eplb_rebalances_total", outcome="failed")
    assert failed == 0  # nothing a caller sent paged anyone (WeightserveRebalanceFailed)
