"""Rebalance's locality over gRPC: the `locality` field, and the trade-off figures GetRebalance reports."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from tests.client.test_control_client import published
from tests.server.test_experts import MODEL, root
from weightserve import FetchError, WeightClient
from weightserve.cli import control as cli_control
from weightserve.eplb import ExpertMapping, Topology, dispatch_nodes
from weightserve.errors import InvalidRequestError
from weightserve.sharding.model_config import ModelConfig
from weightserve.v1 import weightserve_pb2 as pb

__all__ = ["root"]

# Two groups of four experts; group 0 is hot, so balancing across nodes would split it.
HOT = [[1000, 900, 800, 700, 5, 5, 5, 5], [5, 5, 5, 5, 800, 700, 600, 500]]
TOPOLOGY = {"num_nodes": 2, "gpus_per_node": 2, "num_groups": 2, "topk_group": 1}


@pytest.fixture
def client(root, serve) -> Iterator[WeightClient]:  # type: ignore[no-untyped-def]
    with WeightClient(serve(root).address, timeout=30) as c:
        c.report_expert_load(MODEL, HOT)
        yield c


def test_the_default_keeps_groups_on_one_node_and_reports_the_trade_off(client: WeightClient) -> None:
    job_id = client.rebalance(MODEL, num_replicas=12, **TOPOLOGY)
    published(client, job_id)
    job = client.get_rebalance(job_id)
    assert job.group_locality_after == 1.0
    # One group per token, each group on one node: a token reaches exactly one node.
    assert job.dispatch_nodes_after == pytest.approx(1.0)
    assert 0 < job.balancedness_after <= job.locality_bound + 1e-9
    assert 0 < job.group_locality_before <= 1.0 and job.dispatch_nodes_before >= 1.0


def test_relaxed_trades_locality_for_balance(client: WeightClient) -> None:
    grouped = client.rebalance(MODEL, num_replicas=12, **TOPOLOGY)
    published(client, grouped)
    relaxed = client.rebalance(MODEL, locality="relaxed")  # topology and slots kept
    published(client, relaxed)
    before, after = client.get_rebalance(grouped), client.get_rebalance(relaxed)
    assert after.balancedness_after > before.balancedness_after
    assert after.group_locality_after < 1.0
    assert after.dispatch_nodes_after > before.dispatch_nodes_after
    assert after.locality_bound == pytest.approx(before.locality_bound)


def test_a_bad_locality_or_topk_group_is_invalid_argument_naming_the_field(client: WeightClient) -> None:
    with pytest.raises(FetchError) as info:
        client.rebalance(MODEL, num_replicas=12, locality="node", **TOPOLOGY)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "locality must be one of ['group', 'relaxed'], got 'node'" in info.value.details()
    with pytest.raises(FetchError) as info:
        client.rebalance(MODEL, num_replicas=12, **{**TOPOLOGY, "topk_group": 3})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "topk_group must be in [0, 2]" in info.value.details()
    with pytest.raises(InvalidRequestError, match="topk_group=1 needs num_nodes or gpus_per_node"):
        client.rebalance(MODEL, topk_group=1)


def test_the_cli_sends_locality_and_prints_the_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = cli_control.argparse.ArgumentParser()
    cli_control.add_parsers(parser.add_subparsers())
    args = parser.parse_args(["rebalance", MODEL, "--server", "x:1", "--locality", "relaxed", "--topk-group", "4"])
    assert (args.locality, args.topk_group) == ("relaxed", 4)
    with pytest.raises(SystemExit):
        parser.parse_args(["rebalance", MODEL, "--server", "x:1", "--locality", "node"])
    out = io.StringIO()
    monkeypatch.setattr(cli_control.sys, "stdout", out)
    job = pb.GetRebalanceResponse(
        state=pb.JOB_STATE_SUCCEEDED,
        balancedness_before=0.5,
        balancedness_after=0.63,
        locality_bound=0.64,
        group_locality_before=1.0,
        group_locality_after=1.0,
        dispatch_nodes_before=3.02,
        dispatch_nodes_after=3.02,
    )
    assert cli_control.print_job(MODEL, job) == 0
    first, balance, *_ = out.getvalue().splitlines()
    assert first.endswith(
        "group locality 1.000 -> 1.000, dispatch nodes per token 3.02 -> 3.02, "
        "best balancedness with every group on one node 0.640"
    )
    assert balance == "balancedness 0.500 -> 0.630"


# ----------------------------------------------------------- topk_group from config.json

GROUPED = "org/tiny-grouped-moe"
"""The tiny MoE model with a DeepSeek-V3 style config: 4 groups of 2 experts, 3 picked per token."""
SPREAD = [[400, 300, 200, 100, 90, 80, 70, 60], [60, 70, 80, 90, 100, 200, 300, 400]]
FOUR_GROUPS = {"num_nodes": 2, "gpus_per_node": 2, "num_groups": 4}


@pytest.fixture
def grouped_root(root: Path, tmp_path: Path) -> Path:
    """`root`'s MoE checkpoint again as GROUPED, whose config.json names n_group 4 and topk_group 3."""
    model_dir = tmp_path / GROUPED
    shutil.copytree(root / MODEL, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "n_group": 4, "topk_group": 3}))
    return tmp_path


def rebalanced(client: WeightClient, model: str, **request: object) -> tuple[pb.GetRebalanceResponse, ExpertMapping]:
    """Report SPREAD, rebalance, and return the finished job with its mapping as an ExpertMapping."""
    client.report_expert_load(model, SPREAD)
    job = client.get_rebalance(client.rebalance(model, num_replicas=8, **request), wait=60)  # type: ignore[arg-type]
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    m = job.mapping
    topology = Topology(m.topology.num_nodes, m.topology.gpus_per_node, m.topology.num_groups)
    phy2log = torch.tensor(list(m.phy2log)).view(m.num_layers, m.num_physical)
    return job, ExpertMapping.from_phy2log(phy2log, m.num_logical, topology, m.version)


def test_model_config_reads_topk_group_and_n_group() -> None:
    deepseek = ModelConfig.from_dict({"model_type": "deepseek_v3", "n_group": 8, "topk_group": 4})
    assert (deepseek.n_group, deepseek.topk_group) == (8, 4)
    nested = ModelConfig.from_dict({"text_config": {"n_group": 4, "topk_group": 2}})
    assert (nested.n_group, nested.topk_group) == (4, 2)
    # only an estimate reads them: a value that is no positive integer is ignored, never an error
    odd = ModelConfig.from_dict({"n_group": None, "topk_group": "4"})
    assert (odd.n_group, odd.topk_group) == (0, 0)
    assert ModelConfig.from_dict({"model_type": "mixtral"}).topk_group == 0


def test_the_dispatch_estimate_takes_topk_group_from_the_config(grouped_root: Path, root: Path, serve) -> None:  # type: ignore[no-untyped-def]
    weight = torch.tensor(SPREAD)
    with WeightClient(serve(grouped_root, root).address, timeout=30) as client:
        job, mapping = rebalanced(client, GROUPED, **FOUR_GROUPS)  # topk_group left at 0
        # the config's 3 of 4 groups per token, not the fallback's half (2)
        assert job.dispatch_nodes_after == pytest.approx(dispatch_nodes(weight, mapping, 3))
        assert job.dispatch_nodes_after != pytest.approx(dispatch_nodes(weight, mapping, 2))
        # a model whose config names no topk_group falls back to half the groups
        plain, plain_mapping = rebalanced(client, MODEL, **FOUR_GROUPS)
        assert plain.dispatch_nodes_after == pytest.approx(dispatch_nodes(weight, plain_mapping, 2))
        # the request's topk_group wins over the config's
        asked, asked_mapping = rebalanced(client, GROUPED, **FOUR_GROUPS, topk_group=1)
        assert asked.dispatch_nodes_after == pytest.approx(dispatch_nodes(weight, asked_mapping, 1))
        # the config's topk_group counts its own n_group (4) groups: with 2 groups it does not apply
        other, other_mapping = rebalanced(client, GROUPED, **{**FOUR_GROUPS, "num_groups": 2})
        assert other.dispatch_nodes_after == pytest.approx(dispatch_nodes(weight, other_mapping, 1))


def test_num_groups_left_unset_is_the_configs_n_group(grouped_root: Path, root: Path, serve) -> None:  # type: ignore[no-untyped-def]
    with WeightClient(serve(grouped_root, root).address, timeout=30) as client:
        two_nodes = {"num_nodes": 2, "gpus_per_node": 2}
        job, mapping = rebalanced(client, GROUPED, **two_nodes)  # the config says n_group 4
        assert mapping.topology.num_groups == 4 and job.group_locality_after == pytest.approx(1.0)
        _, plain_mapping = rebalanced(client, MODEL, **two_nodes)  # no n_group: no groups
        assert plain_mapping.topology.num_groups == 1
        _, asked_mapping = rebalanced(client, GROUPED, **two_nodes, num_groups=2)  # the request wins
        assert asked_mapping.topology.num_groups == 2
