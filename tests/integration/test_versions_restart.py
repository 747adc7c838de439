"""Versions and expert state across kills and restarts, and a worker updating while a version arrives.

Servers run as `weightserve serve --state-dir` child processes, so a test can SIGKILL one
mid-publish, or stop it with SIGTERM, and start it again on the same state dir.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch

from tests.integration.faultkit import (
    MID_MODEL,
    Background,
    FaultProxy,
    ServerProcess,
    assert_bit_identical,
    wait_until,
)
from weightserve.client import WeightClient
from weightserve.client import versions as client_versions
from weightserve.client.retry import RetryPolicy
from weightserve.config import ServerConfig
from weightserve.testing import BackgroundServer, write_sharded_safetensors
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)

MOE = "org/tiny-moe"
EXPERTS, LAYERS, HIDDEN, INTER = 8, 2, 16, 24
DOWN = "model.layers.1.mlp.down_proj.weight"
PATIENT = RetryPolicy(initial_backoff=0.05, max_backoff=0.25, retry_deadline=60)
CHUNK = 65536


def write_tiny_moe(model_dir: Path) -> None:
    """A Mixtral-shaped model whose expert weights name their layer and expert."""
    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.ones(64, HIDDEN)}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        tensors[p + "self_attn.q_proj.weight"] = torch.full((HIDDEN, HIDDEN), float(layer))
        tensors[p + "block_sparse_moe.gate.weight"] = torch.ones(EXPERTS, HIDDEN)
        for e in range(EXPERTS):
            for w, shape in (("w1", (INTER, HIDDEN)), ("w2", (HIDDEN, INTER)), ("w3", (INTER, HIDDEN))):
                tensors[f"{p}block_sparse_moe.experts.{e}.{w}.weight"] = torch.full(shape, layer * 100.0 + e)
    tensors["model.norm.weight"] = torch.ones(HIDDEN)
    write_sharded_safetensors(tensors, model_dir, 1)
    config = {
        "model_type": "mixtral", "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": EXPERTS, "vocab_size": 64,
    }  # fmt: skip
    (model_dir / "config.json").write_text(json.dumps(config))


@pytest.fixture
def roots(mid_root: Path) -> Path:
    write_tiny_moe(mid_root / MOE)
    return mid_root


def skewed_load(hot: int) -> torch.Tensor:
    load = torch.ones(LAYERS, EXPERTS, dtype=torch.int64)
    load[:, hot] = 1000
    return load


@pytest.mark.fault(
    "server restarted (SIGTERM or SIGKILL) with versions and mappings in use",
    expect="versions, mappings and load windows are read back; since_version and since_mapping work",
)
def test_a_restart_keeps_versions_mappings_and_load_windows(
    roots: Path, tmp_path: Path, server_process: Callable[..., ServerProcess]
) -> None:
    state = tmp_path / "state"
    server = server_process(roots, "--state-dir", str(state)).start()
    with WeightClient(server.address, retry=PATIENT) as client:
        v0 = client.fetch_state_dict(MID_MODEL, 1, 2)
        down = client.fetch_state_dict(MID_MODEL, names=[DOWN])[DOWN]
        assert client.publish(MID_MODEL, {DOWN: down + 1}) == 1
        client.report_expert_load(MOE, skewed_load(0), ep_rank=0, sequence=1)
        job = client.get_rebalance(client.rebalance(MOE, num_nodes=1, gpus_per_node=2), wait=60)
        assert job.state == pb.JOB_STATE_SUCCEEDED, job
        moved = job.mapping.version
        before = client.fetch_state_dict(MOE, ep_rank=1, ep_size=2)
        server.terminate()  # a clean stop snapshots the load windows
        assert server.proc is not None and server.proc.wait(30) == 0

        server.start()
        versions = client.list_versions(MID_MODEL)
        assert [v.version for v in versions] == [0, 1] and versions[1].tensors_published == 1
        held = {k: t.clone() for k, t in v0.items()}
        assert client.update(held, MID_MODEL, 1, 2, since_version=0) == 1
        assert_bit_identical(held, client.fetch_state_dict(MID_MODEL, 1, 2))

        # The mapping published before the restart is still the one in force, and a delta from it is empty.
        assert client.fetch_state_dict(MOE, ep_rank=1, ep_size=2, since_mapping=moved) == {}
        assert_bit_identical(client.fetch_state_dict(MOE, ep_rank=1, ep_size=2), before)
        # The load window came back: a rebalance needs no new report, and a retried report is recognised.
        job = client.get_rebalance(client.rebalance(MOE, num_nodes=1, gpus_per_node=2), wait=60)
        assert job.state == pb.JOB_STATE_SUCCEEDED and job.mapping.version > moved, job
        newest = job.mapping.version
        assert client.report_expert_load(MOE, skewed_load(0), ep_rank=0, sequence=1) == 1
        assert client.report_expert_load(MOE, skewed_load(1), ep_rank=0, sequence=2) == 2

        server.kill()  # no clean stop: what was published is on disk already
        server.start()
        assert [v.version for v in client.list_versions(MID_MODEL)] == [0, 1]
        assert client.fetch_state_dict(MOE, ep_rank=0, ep_size=2, since_mapping=newest) == {}


@pytest.mark.fault("server SIGKILLed mid-publish", expect="no version appears; the upload resumes after the restart")
def test_a_server_killed_mid_publish_shows_no_version_and_the_upload_resumes_after_restart(
    roots: Path, tmp_path: Path, server_process: Callable[..., ServerProcess]
) -> None:
    server = server_process(roots, "--state-dir", str(tmp_path / "state")).start()
    with WeightClient(server.address, retry=PATIENT) as client:
        down = client.fetch_state_dict(MID_MODEL, names=[DOWN])[DOWN]
    tensors = client_versions.outgoing({DOWN: down * 2})
    requests = list(client_versions.upload_requests("", tensors, [0], chunk_bytes=CHUNK))
    half, stalled = len(requests) // 2, threading.Event()

    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.VersionServiceStub(channel)
        upload_id = stub.StartPublish(client_versions.start_request(MID_MODEL, tensors, None)).upload_id

        def first_half() -> Iterator[pb.PublishVersionRequest]:
            for request in requests[:half]:
                request.upload_id = upload_id
                yield request
            stalled.set()
            threading.Event().wait(60)  # the stream stays open until the server dies

        call = Background(lambda: stub.PublishVersion(first_half()))
        assert stalled.wait(30)
        wait_until(
            lambda: sum(stub.GetPublish(pb.GetPublishRequest(upload_id=upload_id)).received) > 0, 20, "bytes to land"
        )
        server.kill()
        with pytest.raises(grpc.RpcError):
            call.result(timeout=30)

    server.start()
    with WeightClient(server.address, retry=PATIENT) as client:
        assert [v.version for v in client.list_versions(MID_MODEL)] == [0]
        assert client.fetch_state_dict(MID_MODEL, names=[DOWN])[DOWN].equal(down)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.VersionServiceStub(channel)
        status = stub.GetPublish(pb.GetPublishRequest(upload_id=upload_id))
        assert not status.committed and 0 < status.received[0] < tensors[0].nbytes
        done = stub.PublishVersion(client_versions.upload_requests(upload_id, tensors, status.received, CHUNK))
        assert done.committed and done.version == 1
    with WeightClient(server.address, retry=PATIENT) as client:
        assert client.fetch_state_dict(MID_MODEL, names=[DOWN])[DOWN].equal(down * 2)


@pytest.mark.fault(
    "version published while an update is in flight and its stream breaks",
    expect="the update resumes and ends on the version it began, bit-identical",
)
def test_an_update_in_flight_when_a_new_version_arrives_finishes_on_the_version_it_began(
    mid_root: Path,
    tmp_path: Path,
    proxy: Callable[..., FaultProxy],
    slow_client: Callable[..., WeightClient],
) -> None:
    config = ServerConfig(
        model_roots=(mid_root,), listen="127.0.0.1:0", metrics_listen="off", state_dir=tmp_path / "state",
        chunk_bytes=CHUNK,
    )  # fmt: skip
    with BackgroundServer(config) as server, WeightClient(server.address) as trainer:
        v0 = trainer.fetch_state_dict(MID_MODEL)
        v1 = {name: t + 1 for name, t in v0.items()}
        assert trainer.publish(MID_MODEL, v1) == 1
        link = proxy(server.server.port)  # type: ignore[union-attr]
        with slow_client(link.address, retry=PATIENT) as worker:
            held = {k: t.clone() for k, t in v0.items()}
            link.pause_after(link.s2c_bytes + trainer.get_manifest(MID_MODEL).total_bytes // 2)
            update = Background(lambda: worker.update(held, MID_MODEL, since_version=0))
            assert link.paused.wait(30), "the update never got half way"
            assert trainer.publish(MID_MODEL, {name: t + 2 for name, t in v0.items()}) == 2
            link.sever()  # the worker resumes after version 2 exists
            link.resume()
            assert update.result(timeout=60) == 1
            assert worker.last_fetch_stats is not None and worker.last_fetch_stats.reconnects >= 1
            assert_bit_identical(held, v1)  # all of version 1, nothing of 2 mixed in
            assert worker.update(held, MID_MODEL, since_version=1) == 2
            assert_bit_identical(held, {name: t + 2 for name, t in v0.items()})
