"""One request cannot take the server down: every size a request names is bounded before any work.

Each case once exhausted the server's memory or its event loop (issue 10); each must now be
INVALID_ARGUMENT naming the limit, answered at once, while other clients keep being served.
"""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from tests.conftest import ServeFn
from tests.server.test_experts import MODEL as MOE_MODEL
from tests.server.test_experts import root as moe_root  # noqa: F401 - the module-scoped MoE fixture
from weightserve.client import WeightClient
from weightserve.config import ServerConfig
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(60)
INT64_MAX = 2**63 - 1


def call_error(call) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)
    return info.value


def stubs(address: str) -> tuple[pb_grpc.WeightServiceStub, pb_grpc.ControlServiceStub]:
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)])
    return pb_grpc.WeightServiceStub(channel), pb_grpc.ControlServiceStub(channel)


def shard(model: str = "org/tiny-llama", **fields: int) -> pb.ShardSpec:
    return pb.ShardSpec(model=model, **fields)


@pytest.fixture
def both_roots(model_root: Path, moe_root: Path, serve):  # type: ignore[no-untyped-def]  # noqa: F811
    server = serve(model_root, moe_root)
    return server, *stubs(server.address)


@pytest.mark.parametrize(
    ("what", "request_of", "limit"),
    [
        (
            "pp_size 2^31-1",
            lambda: pb.GetManifestRequest(shard=shard(pp_size=2**31 - 1)),
            "pp_size 2147483647 must be within",
        ),
        (
            "pp_size over layers",
            lambda: pb.GetManifestRequest(shard=shard(pp_size=3)),
            "exceeds the model's 2 decoder layers",
        ),
        (
            "world_size 2^31-1",
            lambda: pb.GetManifestRequest(shard=shard(world_size=2**31 - 1)),
            "must be within [1, 65536]",
        ),
        (
            "1 MiB model name",
            lambda: pb.GetManifestRequest(shard=shard("m" * 2**20)),
            "model name is 1048576 bytes; the limit is 1024",
        ),
        ("a/ x 2^19 model name", lambda: pb.GetManifestRequest(shard=shard("a/" * 2**19)), "the limit is 1024"),
        (
            "deep model name",
            lambda: pb.GetManifestRequest(shard=shard("a/" * 40 + "b")),
            "41 path parts; the limit is 32",
        ),
        (
            "long revision",
            lambda: pb.GetManifestRequest(shard=pb.ShardSpec(model="org/tiny-llama", revision="r" * 10_000)),
            "revision is 10000 bytes",
        ),
    ],
)
@pytest.mark.fault("request past a static or model limit")
def test_static_limits_are_invalid_argument_naming_the_limit(both_roots, what: str, request_of, limit: str) -> None:  # type: ignore[no-untyped-def]
    _, weights, _ = both_roots
    error = call_error(lambda: weights.GetManifest(request_of(), timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, error.details())
    assert limit in error.details() and len(error.details()) <= 1024, what


@pytest.mark.fault("request past a static or model limit")
def test_fetch_names_transport_and_patterns_are_bounded(both_roots) -> None:  # type: ignore[no-untyped-def]
    _, weights, _ = both_roots
    for request, limit in (
        (pb.FetchShardRequest(shard=shard(), transport=7), "transport 7 is not one this server speaks"),
        (pb.FetchShardRequest(shard=shard(), names=["x" * 5000]), "tensor name is 5000 bytes; the limit is 4096"),
        (pb.FetchShardRequest(shard=shard(), manifest_id="m" * 1000), "manifest id is 1000 bytes"),
    ):
        error = call_error(lambda r=request: weights.FetchShard(r, timeout=10))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and limit in error.details()
    files = pb.FetchFilesRequest(model="org/tiny-llama", patterns=["*"] * 65)
    error = call_error(lambda: weights.FetchFiles(files, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "65 file patterns; the limit is 64" in error.details()


@pytest.mark.fault("request past a static or model limit")
def test_prefetch_of_many_ranks_is_refused_at_once(both_roots) -> None:  # type: ignore[no-untyped-def]
    _, weights, _ = both_roots
    for request, limit in (
        (
            pb.PrefetchRequest(model="org/tiny-llama", world_size=60_000, ranks=list(range(100_000))[:50_000]),
            "50000 ranks; the limit is 1024",
        ),
        (pb.PrefetchRequest(model="org/tiny-llama", world_size=60_000), "1025 ranks; the limit is 1024"),
        (pb.PrefetchRequest(model="org/tiny-llama", world_size=2, ranks=[5]), "prefetch rank 5 must satisfy"),
    ):
        error = call_error(lambda r=request: weights.Prefetch(r, timeout=10))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and limit in error.details(), error.details()


@pytest.mark.fault("request past a static or model limit")
def test_expert_placements_are_bounded_by_the_model(both_roots) -> None:  # type: ignore[no-untyped-def]
    _, weights, control = both_roots
    huge = pb.GetManifestRequest(shard=shard(MOE_MODEL, ep_size=4, num_redundant_experts=10**6))
    error = call_error(lambda: weights.GetManifest(huge, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "the limit is 32" in error.details(), error.details()
    load = pb.ExpertCounts(moe_layers=2, experts=8, counts=[1] * 16)
    control.ReportExpertLoad(pb.ReportExpertLoadRequest(model=MOE_MODEL, load=load))
    topology = pb.ExpertTopology(num_nodes=1, gpus_per_node=4)
    for request, limit in (
        (pb.RebalanceRequest(model=MOE_MODEL, num_replicas=10**5, topology=topology), "100000 expert slots"),
        (
            pb.RebalanceRequest(model=MOE_MODEL, topology=pb.ExpertTopology(num_nodes=2**20, gpus_per_node=2**10)),
            "the limit is 4096",
        ),
        (
            pb.RebalanceRequest(
                model=MOE_MODEL, topology=pb.ExpertTopology(num_nodes=1, gpus_per_node=4, num_groups=99)
            ),
            "99 expert groups",
        ),
    ):
        error = call_error(lambda r=request: control.Rebalance(r, timeout=10))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and limit in error.details(), error.details()


@pytest.mark.fault("load report that could overflow, or sent twice")
def test_load_counts_that_could_overflow_are_refused_and_retries_count_once(both_roots) -> None:  # type: ignore[no-untyped-def]
    _, _, control = both_roots
    big = pb.ExpertCounts(moe_layers=2, experts=8, counts=[INT64_MAX] + [1] * 15)
    for _ in range(2):  # two of them used to overflow the window's sum
        error = call_error(lambda: control.ReportExpertLoad(pb.ReportExpertLoadRequest(model=MOE_MODEL, load=big)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "outside [0, 2^48]" in error.details()
    load = pb.ExpertCounts(moe_layers=2, experts=8, counts=[3] * 16)
    first = control.ReportExpertLoad(pb.ReportExpertLoadRequest(model=MOE_MODEL, load=load, ep_rank=1, sequence=7))
    again = control.ReportExpertLoad(pb.ReportExpertLoadRequest(model=MOE_MODEL, load=load, ep_rank=1, sequence=7))
    other = control.ReportExpertLoad(pb.ReportExpertLoadRequest(model=MOE_MODEL, load=load, ep_rank=2, sequence=7))
    later = control.ReportExpertLoad(pb.ReportExpertLoadRequest(model=MOE_MODEL, load=load, ep_rank=1, sequence=8))
    assert (first.duplicate, again.duplicate, other.duplicate, later.duplicate) == (False, True, False, False)
    assert again.reports_in_window == first.reports_in_window
    assert later.reports_in_window == first.reports_in_window + 2
    topology = pb.ExpertTopology(num_nodes=1, gpus_per_node=4)
    job = control.GetRebalance(
        pb.GetRebalanceRequest(
            job_id=control.Rebalance(pb.RebalanceRequest(model=MOE_MODEL, topology=topology)).job_id, wait_seconds=60
        )
    )
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error  # the window is still usable


@pytest.mark.fault("request past a static or model limit")
def test_other_clients_are_served_while_hostile_requests_arrive(both_roots, model_root: Path) -> None:  # type: ignore[no-untyped-def]
    server, weights, _ = both_roots
    hostile = [pb.GetManifestRequest(shard=shard("a/" * 2**19)), pb.GetManifestRequest(shard=shard(pp_size=2**31 - 1))]
    stop = threading.Event()

    def attack() -> None:
        while not stop.is_set():
            for request in hostile:
                call_error(lambda r=request: weights.GetManifest(r, timeout=10))

    attacker = threading.Thread(target=attack)
    attacker.start()
    try:
        with WeightClient(server.address, timeout=10) as client:
            for _ in range(3):
                assert client.fetch_state_dict("org/tiny-llama")
    finally:
        stop.set()
        attacker.join(30)


@pytest.mark.fault("bad or unknown server setting")
def test_a_cache_budget_below_the_read_pool_reserve_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match=r"cache_memory 1048576 is below the .* bytes the read pool"):
        ServerConfig(cache_memory=1 << 20, read_threads=2)
    assert ServerConfig(cache_memory=64 << 20, read_threads=2).cache_memory == 64 << 20
    assert ServerConfig(cache_memory=0).cache_memory == 0


LONG_PART = "org/" + "x" * 300
"""304 bytes and 2 parts, within the name limits, but one part over the file systems' 255."""


@pytest.mark.fault("request past a static or model limit", cases=9)
def test_a_name_part_over_255_bytes_is_invalid_argument_on_every_rpc(
    model_root: Path,
    moe_root: Path,  # noqa: F811
    serve: ServeFn,
    tmp_path: Path,
) -> None:
    server = serve(model_root, moe_root, state_dir=tmp_path / "state")
    weights, control = stubs(server.address)
    versions = pb_grpc.VersionServiceStub(grpc.insecure_channel(server.address))
    spec = shard(LONG_PART)
    tensor = pb.TensorInfo(name="w", dtype="F32", shape=[1], nbytes=4)
    calls = {
        "GetManifest": lambda: weights.GetManifest(pb.GetManifestRequest(shard=spec), timeout=10),
        "FetchShard": lambda: weights.FetchShard(pb.FetchShardRequest(shard=spec), timeout=10),
        "FetchFiles": lambda: weights.FetchFiles(pb.FetchFilesRequest(model=LONG_PART), timeout=10),
        "Prefetch": lambda: weights.Prefetch(pb.PrefetchRequest(model=LONG_PART), timeout=10),
        "Evict": lambda: weights.Evict(pb.EvictRequest(model=LONG_PART), timeout=10),
        "ReportExpertLoad": lambda: control.ReportExpertLoad(
            pb.ReportExpertLoadRequest(model=LONG_PART, load=pb.ExpertCounts(moe_layers=1, experts=1, counts=[1])),
            timeout=10,
        ),
        "Rebalance": lambda: control.Rebalance(pb.RebalanceRequest(model=LONG_PART), timeout=10),
        "WatchExpertMapping": lambda: control.WatchExpertMapping(
            pb.WatchExpertMappingRequest(model=LONG_PART), timeout=10
        ),
        "StartPublish": lambda: versions.StartPublish(
            pb.StartPublishRequest(model=LONG_PART, tensors=[tensor]), timeout=10
        ),
    }
    for method, call in calls.items():
        error = call_error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error.code(), error.details())
        assert "path part of 300 bytes" in error.details() and "at most 255 bytes" in error.details(), method
