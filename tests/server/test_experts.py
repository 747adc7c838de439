"""Expert parallelism end to end: load reports, background rebalances, per-rank deltas."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import grpc
import pytest
import torch

from weightserve.client import WeightClient
from weightserve.eplb import Policy, policy_for
from weightserve.eplb.policies.base import POLICIES
from weightserve.errors import FetchError
from weightserve.testing import write_sharded_safetensors
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc

MODEL = "org/tiny-mixtral"
EXPERTS, LAYERS, HIDDEN, INTER = 8, 2, 16, 24


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("moe")
    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.arange(64 * HIDDEN).reshape(64, HIDDEN)}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        tensors[p + "input_layernorm.weight"] = torch.ones(HIDDEN)
        for name, rows in (
            ("q_proj", HIDDEN),
            ("k_proj", HIDDEN // 2),
            ("v_proj", HIDDEN // 2),
            ("o_proj", HIDDEN),
        ):
            tensors[f"{p}self_attn.{name}.weight"] = torch.randn(rows, HIDDEN)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN)
        tensors[p + "block_sparse_moe.gate.weight"] = torch.randn(EXPERTS, HIDDEN)
        for e in range(EXPERTS):
            q = f"{p}block_sparse_moe.experts.{e}."
            # every value names its layer and expert, so a test sees which expert arrived
            tensors[q + "w1.weight"] = torch.full((INTER, HIDDEN), layer * 100.0 + e)
            tensors[q + "w2.weight"] = torch.full((HIDDEN, INTER), layer * 100.0 + e)
            tensors[q + "w3.weight"] = torch.full((INTER, HIDDEN), layer * 100.0 + e)
    tensors |= {"model.norm.weight": torch.ones(HIDDEN), "lm_head.weight": torch.randn(64, HIDDEN)}
    model_dir = root / MODEL
    write_sharded_safetensors(tensors, model_dir, 2)
    config = {
        "model_type": "mixtral",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": EXPERTS,
        "vocab_size": 64,
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    return root


def expert_of(tensor: torch.Tensor, layer: int) -> int:
    return int(tensor.flatten()[0].item()) - layer * 100


def control(address: str) -> pb_grpc.ControlServiceStub:
    return pb_grpc.ControlServiceStub(grpc.insecure_channel(address))


def report(stub: pb_grpc.ControlServiceStub, counts: list[list[int]]) -> int:
    flat = [c for row in counts for c in row]
    load = pb.ExpertCounts(moe_layers=len(counts), experts=len(counts[0]), counts=flat)
    return stub.ReportExpertLoad(pb.ReportExpertLoadRequest(model=MODEL, load=load)).reports_in_window


def wait_job(stub: pb_grpc.ControlServiceStub, job_id: str, timeout: float = 60) -> pb.GetRebalanceResponse:
    """The job once it ends: the server holds GetRebalance(wait_seconds) until then, failure included."""
    return stub.GetRebalance(pb.GetRebalanceRequest(job_id=job_id, wait_seconds=timeout), timeout=timeout + 10)


def test_version_zero_gives_contiguous_experts_whole_and_named_by_slot(root, serve):  # type: ignore[no-untyped-def]
    server = serve(root)
    with WeightClient(server.address) as client:
        manifest = client.get_manifest(MODEL, ep_rank=1, ep_size=4)
        assert manifest.experts.mapping_version == 0
        assert [list(layer.logical_experts) for layer in manifest.experts.layers] == [[2, 3], [2, 3]]
        state = client.fetch_state_dict(MODEL, ep_rank=1, ep_size=4, rank=0, world_size=2)
    for layer in range(LAYERS):
        for slot, expert in enumerate((2, 3)):
            w1 = state[f"model.layers.{layer}.block_sparse_moe.experts.{slot}.w1.weight"]
            assert w1.shape == (INTER, HIDDEN)  # whole, not TP-sliced
            assert expert_of(w1, layer) == expert
        assert f"model.layers.{layer}.block_sparse_moe.experts.2.w1.weight" not in state
    assert state["model.layers.0.self_attn.q_proj.weight"].shape == (HIDDEN // 2, HIDDEN)  # TP-sliced


def test_rebalance_then_fetch_only_the_moved_experts(root, serve):  # type: ignore[no-untyped-def]
    server = serve(root)
    stub = control(server.address)
    hot = [[1000, 900, 5, 5, 5, 5, 5, 5], [5, 5, 5, 5, 5, 5, 800, 700]]
    assert report(stub, hot) == 1
    topology = pb.ExpertTopology(num_nodes=1, gpus_per_node=4, num_groups=1)
    started = stub.Rebalance(pb.RebalanceRequest(model=MODEL, num_replicas=12, topology=topology))
    job = wait_job(stub, started.job_id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    assert job.mapping.version > 0 and job.balancedness_after > job.balancedness_before
    new = torch.tensor(list(job.mapping.phy2log)).view(LAYERS, 12)
    with WeightClient(server.address) as client:
        for rank in range(4):
            full = client.get_manifest(MODEL, ep_rank=rank, ep_size=4)
            held = [list(layer.logical_experts) for layer in full.experts.layers]
            assert held == new[:, rank * 3 : (rank + 1) * 3].tolist()
            delta = client.fetch_state_dict(MODEL, ep_rank=rank, ep_size=4, since_mapping=0, num_redundant_experts=4)
            before = client.get_manifest(MODEL, ep_rank=rank, ep_size=4, since_mapping=0, num_redundant_experts=4)
            before = before.experts
            sent = [list(layer.sent_slots) for layer in before.layers]
            assert all(k.startswith("model.layers.") and ".experts." in k for k in delta)  # experts only
            for layer in range(LAYERS):
                for slot in sent[layer]:
                    w2 = delta[f"model.layers.{layer}.block_sparse_moe.experts.{slot}.w2.weight"]
                    assert expert_of(w2, layer) == held[layer][slot]
        assert job.deltas and sum(d.experts for d in job.deltas) == sum(
            len(layer.sent_slots)
            for rank in range(4)
            for layer in client.get_manifest(
                MODEL, ep_rank=rank, ep_size=4, since_mapping=0, num_redundant_experts=4
            ).experts.layers
        )


def test_invalid_reports_change_nothing(root, serve):  # type: ignore[no-untyped-def]
    server = serve(root)
    stub = control(server.address)
    for bad in ([[1] * 7, [1] * 7], [[1] * 8], [[-1] + [1] * 7, [1] * 8]):
        with pytest.raises(grpc.RpcError) as err:
            report(stub, bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        stub.ReportExpertLoad(pb.ReportExpertLoadRequest(model="org/nope", load=pb.ExpertCounts()))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:  # nothing was recorded, so there is nothing to rebalance
        stub.Rebalance(pb.RebalanceRequest(model=MODEL, topology=pb.ExpertTopology(num_nodes=1, gpus_per_node=4)))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.fault("expert mapping version reused, forgotten or unknown")
def test_unknown_mapping_version_is_failed_precondition(root, serve):  # type: ignore[no-untyped-def]
    server = serve(root)
    with WeightClient(server.address) as client, pytest.raises(FetchError) as err:
        client.fetch_state_dict(MODEL, ep_rank=0, ep_size=4, since_mapping=7)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_watch_streams_each_new_version(root, serve):  # type: ignore[no-untyped-def]
    server = serve(root)
    stub = control(server.address)
    report(stub, [[10, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 10]])
    topology = pb.ExpertTopology(num_nodes=1, gpus_per_node=4)
    first = wait_job(stub, stub.Rebalance(pb.RebalanceRequest(model=MODEL, topology=topology)).job_id)
    watch = stub.WatchExpertMapping(pb.WatchExpertMappingRequest(model=MODEL, after_version=0), timeout=30)
    seen = [next(watch).mapping.version]
    report(stub, [[1, 1, 1, 10, 1, 1, 1, 1], [10, 1, 1, 1, 1, 1, 1, 1]])
    second = wait_job(stub, stub.Rebalance(pb.RebalanceRequest(model=MODEL)).job_id)
    seen.append(next(watch).mapping.version)
    watch.cancel()
    assert seen == [first.mapping.version, second.mapping.version] and 0 < seen[0] < seen[1]


class GatedPolicy(Policy):
    """The greedy placement, once the test opens the gate: the job runs exactly as long as the test wants."""

    gate = threading.Event()

    def place(self, problem, previous):  # type: ignore[no-untyped-def]
        assert self.gate.wait(timeout=60), "the test never opened the gate"
        return policy_for("greedy")().place(problem, previous)


def test_fetch_completes_while_a_slow_rebalance_runs_and_rebalances_serialize(root, serve):  # type: ignore[no-untyped-def]
    GatedPolicy.gate.clear()
    with POLICIES.registered("gated-test", GatedPolicy):
        server = serve(root)
        stub = control(server.address)
        report(stub, [[5, 1, 1, 1, 1, 1, 1, 9], [1, 9, 1, 1, 1, 1, 1, 5]])
        topology = pb.ExpertTopology(num_nodes=1, gpus_per_node=4)
        first = stub.Rebalance(pb.RebalanceRequest(model=MODEL, policy="gated-test", topology=topology))
        second = stub.Rebalance(pb.RebalanceRequest(model=MODEL, policy="gated-test", topology=topology))
        assert second.already_running and second.job_id == first.job_id
        try:
            with WeightClient(server.address) as client:
                state = client.fetch_state_dict(MODEL)  # served while the job computes
            assert stub.GetRebalance(pb.GetRebalanceRequest(job_id=first.job_id)).state == pb.JOB_STATE_RUNNING
        finally:
            GatedPolicy.gate.set()
        assert wait_job(stub, first.job_id).state == pb.JOB_STATE_SUCCEEDED
    assert "gated-test" not in POLICIES
    assert len(state) == 3 + LAYERS * (2 + 4 + 1 + 3 * EXPERTS)  # norms, attention, router, experts


def test_get_rebalance_waits_for_the_job_to_end(root, serve):  # type: ignore[no-untyped-def]
    GatedPolicy.gate.clear()
    with POLICIES.registered("gated-test", GatedPolicy):
        stub = control(serve(root).address)
        report(stub, [[5, 1, 1, 1, 1, 1, 1, 9], [1, 9, 1, 1, 1, 1, 1, 5]])
        topology = pb.ExpertTopology(num_nodes=1, gpus_per_node=4)
        job_id = stub.Rebalance(pb.RebalanceRequest(model=MODEL, policy="gated-test", topology=topology)).job_id
        # a short wait on a job that cannot end answers "running" when the wait runs out
        assert stub.GetRebalance(pb.GetRebalanceRequest(job_id=job_id, wait_seconds=0.05)).state == pb.JOB_STATE_RUNNING
        waiting = stub.GetRebalance.future(pb.GetRebalanceRequest(job_id=job_id, wait_seconds=60))
        assert not waiting.done()
        GatedPolicy.gate.set()
        assert waiting.result(timeout=60).state == pb.JOB_STATE_SUCCEEDED


@pytest.mark.fault("unknown or expired control job")
def test_unknown_job_is_not_found_naming_the_id(root, serve):  # type: ignore[no-untyped-def]
    stub = control(serve(root).address)
    with pytest.raises(grpc.RpcError) as info:
        stub.GetRebalance(pb.GetRebalanceRequest(job_id="feedface"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "rebalance job 'feedface'" in info.value.details()


@pytest.mark.fault("unknown or expired control job")
def test_finished_jobs_expire_oldest_first(root, serve, monkeypatch):  # type: ignore[no-untyped-def]
    from weightserve.server import control_plane

    monkeypatch.setattr(control_plane, "MAX_FINISHED_JOBS", 2)
    stub = control(serve(root).address)
    report(stub, [[5, 1, 1, 1, 1, 1, 1, 9], [1, 9, 1, 1, 1, 1, 1, 5]])
    topology = pb.ExpertTopology(num_nodes=1, gpus_per_node=4)
    jobs = []
    for _ in range(3):
        jobs.append(stub.Rebalance(pb.RebalanceRequest(model=MODEL, topology=topology)).job_id)
        assert wait_job(stub, jobs[-1]).state == pb.JOB_STATE_SUCCEEDED
    with pytest.raises(grpc.RpcError) as info:
        stub.GetRebalance(pb.GetRebalanceRequest(job_id=jobs[0]))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert [stub.GetRebalance(pb.GetRebalanceRequest(job_id=j)).job_id for j in jobs[1:]] == jobs[1:]


def test_vllm_layout_stacks_the_rank_slots(root, serve):  # type: ignore[no-untyped-def]
    server = serve(root)
    with WeightClient(server.address) as client:
        state = client.fetch_state_dict(MODEL, ep_rank=3, ep_size=4, layout="vllm")
    w13 = state["model.layers.1.block_sparse_moe.experts.w13_weight"]
    w2 = state["model.layers.1.block_sparse_moe.experts.w2_weight"]
    assert w13.shape == (2, 2 * INTER, HIDDEN) and w2.shape == (2, HIDDEN, INTER)
    assert [expert_of(w13[slot], 1) for slot in range(2)] == [6, 7]
    assert "model.layers.1.self_attn.qkv_proj.weight" in state


def test_a_delta_holding_only_new_slots_sends_no_other_tensors(root):  # type: ignore[no-untyped-def]
    from weightserve.loaders import loader_for
    from weightserve.loaders.formats import model_files
    from weightserve.sharding.experts import ExpertSlots, moe_layout
    from weightserve.sharding.plan import plan_shard
    from weightserve.sharding.spec import ShardSpec

    with loader_for("safetensors")(model_files(root / MODEL).files) as loader:
        layout = moe_layout(loader.records)
        assert layout is not None
        every_slot_new = ExpertSlots(1, layout.layers, ((0, 1),) * LAYERS, ((5, 6),) * LAYERS, ((0, 1),) * LAYERS, True)
        spec = ShardSpec(MODEL, ep_rank=0, ep_size=4, since_mapping=0)
        names = [p.name for p in plan_shard(loader.records, spec, experts=every_slot_new)]
    assert len(names) == LAYERS * 2 * 3 and all(".experts." in n for n in names)


def _held(client: WeightClient, rank: int, **kw: int) -> tuple[str, list[list[int]], dict[str, torch.Tensor]]:
    manifest = client.get_manifest(MODEL, ep_rank=rank, ep_size=4, **kw)
    held = [list(layer.logical_experts) for layer in manifest.experts.layers]
    state = client.fetch_state_dict(MODEL, ep_rank=rank, ep_size=4, **kw)
    return manifest.manifest_id, held, state


def _assert_slots_hold(state: dict[str, torch.Tensor], held: list[list[int]]) -> None:
    for layer, experts in enumerate(held):
        for slot, expert in enumerate(experts):
            assert expert_of(state[f"model.layers.{layer}.block_sparse_moe.experts.{slot}.w1.weight"], layer) == expert


@pytest.mark.fault("expert mapping version reused, forgotten or unknown")
def test_a_version_names_one_placement_forever_even_when_the_shape_changes(root, serve):  # type: ignore[no-untyped-def]
    """Rebalancing to another slot count used to re-publish versions 0 and 1 in place, and a
    cached plan of the old placement was served under the new manifest."""
    server = serve(root)
    stub = control(server.address)
    report(stub, [[50, 1, 1, 1, 1, 1, 1, 40], [1, 30, 1, 1, 1, 1, 60, 1]])
    versions = []
    with WeightClient(server.address) as client:
        first_id, first_held, state = _held(client, 1)  # version 0, as the engine starts
        _assert_slots_hold(state, first_held)
        seen = {first_id}
        for replicas in (12, 8, 12):
            topology = pb.ExpertTopology(num_nodes=1, gpus_per_node=4)
            job = wait_job(
                stub, stub.Rebalance(pb.RebalanceRequest(model=MODEL, num_replicas=replicas, topology=topology)).job_id
            )
            assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
            versions.append(job.mapping.version)
            manifest_id, held, state = _held(client, 1)
            _assert_slots_hold(state, held)  # the bytes are the experts the manifest names
            assert held == [
                list(job.mapping.phy2log[layer * replicas + replicas // 4 : layer * replicas + 2 * replicas // 4])
                for layer in range(LAYERS)
            ]
            seen.add(manifest_id)
    assert versions == sorted(set(versions)) and 0 not in versions  # new, increasing, never 0 again
    assert len(seen) == 4  # four placements, four manifest ids


@pytest.mark.fault("expert mapping version reused, forgotten or unknown")
def test_a_restarted_server_refuses_a_version_it_never_published(root, serve):  # type: ignore[no-untyped-def]
    topology = pb.ExpertTopology(num_nodes=1, gpus_per_node=4)
    load = [[50, 1, 1, 1, 1, 1, 1, 40], [1, 30, 1, 1, 1, 1, 60, 1]]
    first = serve(root)
    stub = control(first.address)
    report(stub, load)
    old = wait_job(stub, stub.Rebalance(pb.RebalanceRequest(model=MODEL, topology=topology)).job_id).mapping.version
    first.stop()
    restarted = serve(root)  # the same checkpoint, its history gone
    stub = control(restarted.address)
    report(stub, load)
    new = wait_job(stub, stub.Rebalance(pb.RebalanceRequest(model=MODEL, topology=topology)).job_id).mapping.version
    assert new > old  # never the number a worker may still hold for another placement
    with WeightClient(restarted.address) as client, pytest.raises(FetchError) as info:
        client.fetch_state_dict(MODEL, ep_rank=0, ep_size=4, since_mapping=old)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "full share" in info.value.details()


@pytest.mark.fault("one model spelled several ways")
def test_workers_spelling_the_model_differently_share_one_mapping(root, serve):  # type: ignore[no-untyped-def]
    server = serve(root)
    stub = control(server.address)
    report(stub, [[50, 1, 1, 1, 1, 1, 1, 40], [1, 30, 1, 1, 1, 1, 60, 1]])
    topology = pb.ExpertTopology(num_nodes=1, gpus_per_node=4)
    rebalance = pb.RebalanceRequest(model="org//tiny-mixtral/", topology=topology)
    job = wait_job(stub, stub.Rebalance(rebalance).job_id)
    with WeightClient(server.address) as client:
        versions = {
            client.get_manifest(name, ep_rank=0, ep_size=4).experts.mapping_version
            for name in (MODEL, "./org/tiny-mixtral", "org/tiny-mixtral/")
        }
    assert versions == {job.mapping.version}
