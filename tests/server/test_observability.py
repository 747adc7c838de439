"""What an operator sees: /metrics values after known calls, access log lines, readiness and liveness."""

from __future__ import annotations

import json
import logging
import re
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.server.test_experts import MODEL as MOE
from tests.server.test_experts import root as moe_root  # noqa: F401 - the module-scoped MoE fixture
from weightserve.client import WeightClient
from weightserve.config import ServerConfig
from weightserve.errors import FetchError
from weightserve.server import log_setup
from weightserve.server.build import build_server
from weightserve.testing import BackgroundServer
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc

MODEL = "org/tiny-llama"
SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def http(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(server: BackgroundServer) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics: (name, labels) -> value."""
    assert server.server is not None and server.server.side is not None
    status, text = http(f"http://{server.server.side.address}/metrics")
    assert status == 200
    samples = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match and not line.startswith("#"):
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
            samples[(match["name"], labels)] = float(match["value"])
    return samples


def value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    """The sum of `name`'s samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def test_metrics_count_a_known_fetch(model_root: Path, serve) -> None:  # type: ignore[no-untyped-def]
    server = serve(model_root, cache_memory=64 << 20)
    with WeightClient(server.address) as client:
        client.fetch_state_dict(MODEL)
        first = client.last_stats
        client.fetch_state_dict(MODEL)  # warm: from the memory cache
        with pytest.raises(FetchError):
            client.get_manifest("org/missing")
    samples = scrape(server)
    assert first is not None
    assert value(samples, "weightserve_sent_bytes_total", model=MODEL, layout="checkpoint") == 2 * first.bytes_received
    assert value(samples, "grpc_server_handled_total", grpc_method="FetchShard", grpc_code="OK") == 2
    assert value(samples, "grpc_server_handled_total", grpc_method="GetManifest", grpc_code="NOT_FOUND") == 1
    assert value(samples, "grpc_server_started_total", grpc_method="FetchShard", grpc_type="server_stream") == 2
    assert value(samples, "grpc_server_msg_sent_total", grpc_method="FetchShard") >= 2  # small tensors packed
    assert value(samples, "grpc_server_handling_seconds_count", grpc_method="FetchShard") == 2
    assert value(samples, "weightserve_cache_hits_total") > 0 and value(samples, "weightserve_cache_misses_total") > 0
    payload = first.payload_bytes
    assert value(samples, "weightserve_read_bytes_total", source="local") == payload
    assert value(samples, "weightserve_read_bytes_total", source="cache") == payload
    assert value(samples, "weightserve_fetch_seconds_count", model=MODEL) == 2
    assert value(samples, "weightserve_time_to_first_chunk_seconds_count", model=MODEL) == 2
    assert value(samples, "weightserve_model_load_bytes_total", source="local") > 0
    assert value(samples, "weightserve_cache_budget_bytes") == 64 << 20
    assert value(samples, "weightserve_cache_resident_bytes") > 0
    assert value(samples, "weightserve_cache_entries", state="ready") == 1
    assert value(samples, "weightserve_active_streams") == 0
    assert value(samples, "weightserve_build_info") == 1
    assert value(samples, "process_resident_memory_bytes") > 0
    # an unknown name is counted, but never becomes a label
    assert not any(("model", "org/missing") in labels for (_, labels) in samples)


def test_metrics_of_expert_load_and_rebalances(moe_root: Path, serve) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    server = serve(moe_root)
    with WeightClient(server.address) as client:
        client.report_expert_load(MOE, [[50, 1, 1, 1, 1, 1, 1, 40], [1, 30, 1, 1, 1, 1, 60, 1]])
        job = client.get_rebalance(client.rebalance(MOE, num_nodes=1, gpus_per_node=4), wait=60)
    samples = scrape(server)
    assert value(samples, "weightserve_eplb_load_reports_total", model=MOE) == 1
    assert value(samples, "weightserve_eplb_rebalances_total", model=MOE, outcome="succeeded") == 1
    failed = [
        v for (n, ls), v in samples.items() if n == "weightserve_eplb_rebalances_total" and ("outcome", "failed") in ls
    ]
    assert failed == [0.0]  # present from the job's start, at 0, so increase() sees a first failure
    assert value(samples, "weightserve_eplb_mapping_version", model=MOE) == job.mapping.version
    assert value(samples, "weightserve_eplb_balancedness", model=MOE, when="after") == pytest.approx(
        job.balancedness_after
    )
    # one node, one group: every slot is on its group's node and a token reaches that node only
    assert value(samples, "weightserve_eplb_group_locality", model=MOE, when="after") == 1.0
    assert value(samples, "weightserve_eplb_dispatch_nodes_per_token", model=MOE, when="after") == pytest.approx(1.0)
    assert value(samples, "weightserve_eplb_balancedness_bound", model=MOE) == pytest.approx(job.locality_bound)
    assert 0 <= value(samples, "weightserve_eplb_last_report_age_seconds", model=MOE) < 60
    imbalance = {ls: v for (n, ls), v in samples.items() if n == "weightserve_eplb_layer_load_imbalance"}
    assert len(imbalance) == 2 and all(v >= 1 for v in imbalance.values())  # one series per MoE layer, none per expert


def test_metrics_of_the_locality_trade_off(moe_root: Path, serve) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """A relaxed rebalance over two nodes: the gauges hold GetRebalance's figures, per model only."""
    server = serve(moe_root)
    with WeightClient(server.address, timeout=30) as client:
        client.report_expert_load(MOE, [[1000, 900, 800, 700, 5, 5, 5, 5], [5, 5, 5, 5, 800, 700, 600, 500]])
        topology = {"num_nodes": 2, "gpus_per_node": 2, "num_groups": 2, "topk_group": 1}
        grouped = client.get_rebalance(client.rebalance(MOE, num_replicas=12, **topology), wait=60)
        assert grouped.state == pb.JOB_STATE_SUCCEEDED, grouped.error
        job = client.get_rebalance(client.rebalance(MOE, locality="relaxed", **topology), wait=60)
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    samples = scrape(server)
    # the last job's figures, which relaxing made non-trivial: groups split over nodes
    assert job.group_locality_after < 1.0 < job.dispatch_nodes_after and job.locality_bound > 0
    figures = {
        "weightserve_eplb_group_locality": (job.group_locality_before, job.group_locality_after),
        "weightserve_eplb_dispatch_nodes_per_token": (job.dispatch_nodes_before, job.dispatch_nodes_after),
        "weightserve_eplb_balancedness": (job.balancedness_before, job.balancedness_after),
    }
    for name, (before, after) in figures.items():
        assert value(samples, name, model=MOE, when="before") == pytest.approx(before), name
        assert value(samples, name, model=MOE, when="after") == pytest.approx(after), name
    assert value(samples, "weightserve_eplb_balancedness_bound", model=MOE) == pytest.approx(job.locality_bound)
    # the grouped job before it kept every group on one node: its "after" is the relaxed job's "before"
    assert job.group_locality_before == pytest.approx(grouped.group_locality_after) == 1.0
    labels = {name: {key for key, _ in ls} for (name, ls) in samples if name.startswith("weightserve_eplb_") and ls}
    assert labels["weightserve_eplb_group_locality"] == {"model", "when"}
    assert labels["weightserve_eplb_dispatch_nodes_per_token"] == {"model", "when"}
    assert labels["weightserve_eplb_balancedness_bound"] == {"model"}


def test_access_lines_for_success_failure_and_cancel(model_root: Path, serve, caplog) -> None:  # type: ignore[no-untyped-def]
    server = serve(model_root)
    caplog.set_level(logging.INFO, logger="weightserve.access")
    channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.WeightServiceStub(channel)
    metadata = (("x-request-id", "req-1234"),)
    spec = pb.ShardSpec(model=MODEL, rank=1, world_size=2)
    manifest, call = stub.GetManifest.with_call(pb.GetManifestRequest(shard=spec), metadata=metadata)
    assert ("x-request-id", "req-1234") in call.trailing_metadata()  # the caller's id comes back
    with pytest.raises(grpc.RpcError) as info:
        stub.GetManifest(pb.GetManifestRequest(shard=pb.ShardSpec(model="org/missing")))
    assert any(key == "x-request-id" for key, _ in info.value.trailing_metadata())  # a new one for a failure
    stream = stub.FetchShard(pb.FetchShardRequest(shard=spec, manifest_id=manifest.manifest_id))
    next(stream)
    stream.cancel()
    with WeightClient(server.address) as client:
        client.fetch_state_dict(MODEL)
    lines = [r for r in caplog.records if r.name == "weightserve.access"]
    ok = next(r for r in lines if r.rpc == "GetManifest" and r.code == "OK")
    assert ok.request_id == "req-1234" and ok.model == MODEL and ok.shard == "tp 1/2" and ok.peer.startswith("ipv4:")
    failed = next(r for r in lines if r.code == "NOT_FOUND")
    assert failed.rpc == "GetManifest" and failed.levelno == logging.INFO and "org/missing" in failed.getMessage()
    from tests.integration.faultkit import wait_until

    wait_until(
        lambda: any(r.code == "CANCELLED" for r in caplog.records if r.name == "weightserve.access"), 10, "the cancel"
    )
    cancelled = next(r for r in caplog.records if r.name == "weightserve.access" and r.code == "CANCELLED")
    assert cancelled.rpc == "FetchShard" and cancelled.levelno == logging.INFO
    whole = next(r for r in lines if r.rpc == "FetchShard" and r.code == "OK")
    assert whole.bytes > 0 and whole.messages > 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a cancel must not log an error"
    channel.close()


def test_json_log_lines_carry_the_access_fields(capsys) -> None:  # type: ignore[no-untyped-def]
    log_setup.configure("INFO", "json")
    try:
        logging.getLogger("weightserve.access").info(
            "GetManifest m", extra={"rpc": "GetManifest", "model": "m", "bytes": 0, "code": "OK", "request_id": "r1"}
        )
    finally:
        logging.getLogger().handlers.clear()
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["rpc"] == "GetManifest" and line["request_id"] == "r1" and line["level"] == "INFO"
    assert line["logger"] == "weightserve.access" and line["message"] == "GetManifest m"


def test_readiness_and_liveness(model_root: Path) -> None:
    config = ServerConfig(model_roots=(model_root,), listen="127.0.0.1:0")
    server = BackgroundServer(config).start()
    try:
        assert server.server is not None and server.server.side is not None
        side = server.server.side.address
        assert http(f"http://{side}/readyz")[0] == 200 and http(f"http://{side}/livez")[0] == 200
        assert http(f"http://{side}/nope")[0] == 404
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
            for service in ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"):
                method = f"/{service}/ServerReflectionInfo"
                call = channel.stream_stream(method)(iter([b"\x3a\x00"]))  # list_services = ""
                assert b"weightserve.v1.WeightService" in next(call), service
        server.server.ready = False  # as a drain sets it
        assert http(f"http://{side}/readyz")[0] == 503 and http(f"http://{side}/livez")[0] == 200
    finally:
        server.stop()


def test_health_is_not_serving_until_the_roots_are_scanned(model_root: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import threading

    scanned = threading.Event()
    from weightserve.cache.model_cache import ModelCache

    real = ModelCache.local_models

    def slow_scan(self):  # type: ignore[no-untyped-def]
        assert scanned.wait(30)
        return real(self)

    monkeypatch.setattr(ModelCache, "local_models", slow_scan)
    server = BackgroundServer.__new__(BackgroundServer)
    BackgroundServer.__init__(server, ServerConfig(model_roots=(model_root,), listen="127.0.0.1:0"))
    starter = threading.Thread(target=server.start)
    starter.start()
    try:
        from tests.integration.faultkit import wait_until

        wait_until(lambda: server.server is not None and server.server.side is not None, 30, "the side port")
        assert server.server is not None
        with grpc.insecure_channel(f"127.0.0.1:{server.server.port}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert server.server.side is not None and http(f"http://{server.server.side.address}/readyz")[0] == 503
    finally:
        scanned.set()
        starter.join(30)
        server.stop()


def test_a_missing_root_stops_the_server_unless_allowed(tmp_path: Path) -> None:
    missing = tmp_path / "not-mounted"
    with pytest.raises(ValueError, match=r"model root .*not-mounted does not exist; .*--allow-missing-roots"):
        build_server(ServerConfig(model_roots=(missing,), listen="127.0.0.1:0"))
    with BackgroundServer(ServerConfig(model_roots=(missing,), listen="127.0.0.1:0", allow_missing_roots=True)) as s:
        (missing / "org").mkdir(parents=True)  # mounted later: served from then on
        with WeightClient(s.address) as client:
            assert client.list_models() == []


def test_metrics_can_be_turned_off(model_root: Path) -> None:
    with BackgroundServer(ServerConfig(model_roots=(model_root,), listen="127.0.0.1:0", metrics_listen="off")) as s:
        assert s.server is not None and s.server.side is None
        with WeightClient(s.address) as client:
            assert client.fetch_state_dict(MODEL)
