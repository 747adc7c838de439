"""A scrape never holds two samples of one series, whatever the cache dropped or a restart forgot.

Prometheus keeps an arbitrary one of duplicate samples without failing the scrape, so the
stale-reports alert and the dashboard would silently follow the wrong model.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from tests.server.test_experts import LAYERS, MODEL, control, wait_job
from tests.server.test_experts import root as moe_root  # noqa: F401 - the module-scoped MoE fixture
from tests.server.test_observability import http
from weightserve.testing import BackgroundServer
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(60)
MODELS = ("org/moe-a", "org/moe-b")
SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
HOSTILE = ("org/missing-moe", "../escape", "org/moe-a/../../x", "org/tiny-mixtral-" + "x" * 200)


def exposition(server: BackgroundServer) -> str:
    """The raw /metrics text, with no sample merged or dropped."""
    assert server.server is not None and server.server.side is not None
    status, text = http(f"http://{server.server.side.address}/metrics")
    assert status == 200
    return text


def series(text: str) -> collections.Counter[tuple[str, frozenset[tuple[str, str]]]]:
    """How often each (name, labels) pair appears; every sample line must parse."""
    found: collections.Counter[tuple[str, frozenset[tuple[str, str]]]] = collections.Counter()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            match = SAMPLE.match(line)
            assert match, line
            found[match["name"], frozenset(LABEL.findall(match["labels"] or ""))] += 1
    return found


def assert_no_duplicates(text: str) -> collections.Counter[tuple[str, frozenset[tuple[str, str]]]]:
    found = series(text)
    assert [key for key, n in found.items() if n > 1] == []
    types = collections.Counter(line.split()[2] for line in text.splitlines() if line.startswith("# TYPE "))
    assert [family for family, n in types.items() if n > 1] == []  # one family per name, whoever emits it
    promtool = shutil.which("promtool")
    if promtool is not None:  # Debian's prometheus package; `make test` installs it
        command = [promtool, "check", "metrics"]
        checked = subprocess.run(command, input=text, capture_output=True, text=True, timeout=30, check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    return found


def eplb_models(found: collections.Counter[tuple[str, frozenset[tuple[str, str]]]], name: str) -> list[str]:
    return sorted(dict(labels)["model"] for n, labels in found if n == name)


@pytest.fixture
def two_models(moe_root: Path, tmp_path: Path) -> Path:  # noqa: F811
    for name in MODELS:
        shutil.copytree(moe_root / MODEL, tmp_path / "models" / name)
    return tmp_path / "models"


def _report(stub: pb_grpc.ControlServiceStub, model: str) -> None:
    load = pb.ExpertCounts(moe_layers=LAYERS, experts=8, counts=[1, 2, 3, 4, 5, 6, 7, 50] * LAYERS)
    stub.ReportExpertLoad(pb.ReportExpertLoadRequest(model=model, load=load), timeout=10)


@pytest.mark.fault("model name or symlink escaping the roots", expect="never a metric label", cases=len(HOSTILE))
def test_no_duplicate_series_after_evictions_and_a_restart(two_models: Path, tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    state = tmp_path / "state"
    first = serve(two_models, state_dir=state)
    channel = grpc.insecure_channel(first.address)
    stub, weights = control(first.address), pb_grpc.WeightServiceStub(channel)
    for model in MODELS:
        _report(stub, model)
    topology = pb.ExpertTopology(num_nodes=1, gpus_per_node=4)
    assert wait_job(stub, stub.Rebalance(pb.RebalanceRequest(model=MODELS[0], topology=topology)).job_id).mapping
    for name in HOSTILE:
        with pytest.raises(grpc.RpcError):
            _report(stub, name)
    for model in MODELS:  # what an operator, or the LRU under memory pressure, does
        weights.Evict(pb.EvictRequest(model=model))
    found = assert_no_duplicates(exposition(first))
    for family in ("weightserve_eplb_last_report_age_seconds", "weightserve_eplb_load_reports_total"):
        assert eplb_models(found, family) == list(MODELS), family
    assert eplb_models(found, "weightserve_eplb_layer_load_imbalance") == sorted(MODELS * LAYERS)
    assert eplb_models(found, "weightserve_eplb_mapping_version") == [MODELS[0]]
    assert not any(value in {"other", *HOSTILE} for _, labels in found for key, value in labels if key == "model")
    first.stop()

    restarted = serve(two_models, state_dir=state)  # windows and mappings come back before any model opens
    found = assert_no_duplicates(exposition(restarted))
    assert eplb_models(found, "weightserve_eplb_last_report_age_seconds") == list(MODELS)
    assert eplb_models(found, "weightserve_eplb_mapping_version") == [MODELS[0]]
    stub = control(restarted.address)
    _report(stub, MODELS[1])  # opens one model again; a rebalance after the restart is labelled as before
    assert wait_job(stub, stub.Rebalance(pb.RebalanceRequest(model=MODELS[0])).job_id).mapping
    found = assert_no_duplicates(exposition(restarted))
    assert eplb_models(found, "weightserve_eplb_rebalances_total") == [MODELS[0]] * 2  # succeeded and failed
    assert eplb_models(found, "weightserve_eplb_balancedness") == [MODELS[0]] * 2  # before and after
    assert eplb_models(found, "weightserve_eplb_layer_load_imbalance") == sorted(MODELS * LAYERS)
