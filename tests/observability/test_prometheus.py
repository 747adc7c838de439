"""A real Prometheus scrapes real servers: the values it sees, and every expression we ship.

One Prometheus for the module scrapes two servers every second: `fetched` (a memory
cache) takes the known fetches of the first test; `driven` has seen every kind of call
the dashboard and alerts read (fetches, a NOT_FOUND, an expert load report and a
rebalance), so every labelled series exists. Waits poll Prometheus until a scrape that
began after the awaited calls is queryable; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.observability.prometheus import JOB, POLL_SECONDS, START_SECONDS, Prometheus, QueryError
from tests.observability.promql import dashboard_exprs, rule_exprs, selected, substitute
from tests.server.test_experts import MODEL as MOE
from tests.server.test_experts import root
from weightserve.client import WeightClient
from weightserve.config import ServerConfig
from weightserve.errors import FetchError
from weightserve.testing import BackgroundServer
from weightserve.v1 import weightserve_pb2 as pb

__all__ = ["root"]  # the module-scoped MoE checkpoint fixture of tests/server/test_experts.py

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "weightserve.json"
RULES = REPO / "deploy" / "prometheus" / "rules.yaml"
RULES_TEST = REPO / "deploy" / "prometheus" / "rules_test.yaml"
MODEL = "org/tiny-llama"
CACHE = 64 << 20
PROMETHEUS_SERIES = {"up": {"job", "instance"}}
"""Series Prometheus makes itself, not the server."""
TARGET_LABELS = {"job", "instance"}


def side_address(server: BackgroundServer) -> str:
    assert server.server is not None and server.server.side is not None
    return server.server.side.address


@pytest.fixture(scope="module")
def fetched(model_root: Path) -> Iterator[BackgroundServer]:
    """A server with a memory cache that only test_a_scrape_counts_a_known_fetch calls."""
    config = ServerConfig(model_roots=(model_root,), listen="127.0.0.1:0", cache_memory=CACHE)
    server = BackgroundServer(config).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def driven(model_root: Path, root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    """A server that has seen fetches (streamed and over shared memory), a NOT_FOUND, an expert
    load report and a rebalance."""
    socket = tmp_path_factory.mktemp("driven") / "ws.sock"
    config = ServerConfig(model_roots=(model_root, root), listen=f"unix:{socket}", cache_memory=CACHE,
                          metrics_listen="127.0.0.1:0")  # fmt: skip
    server = BackgroundServer(config).start()
    with WeightClient(server.address, timeout=30) as client:
        client.fetch_state_dict(MODEL, transport="grpc")
        client.fetch_state_dict(MODEL, transport="shm")
        client.fetch_state_dict(MOE, transport="grpc")
        with pytest.raises(FetchError):
            client.get_manifest("org/missing")
        client.report_expert_load(MOE, [[50, 1, 1, 1, 1, 1, 1, 40], [1, 30, 1, 1, 1, 1, 60, 1]])
        job = client.get_rebalance(client.rebalance(MOE, num_nodes=1, gpus_per_node=4), wait=60)
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    yield server
    server.stop()


@pytest.fixture(scope="module")
def prometheus(
    tmp_path_factory: pytest.TempPathFactory, fetched: BackgroundServer, driven: BackgroundServer
) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("`prometheus` is not on PATH (Debian: apt-get install prometheus; `make test` does it as root)")
    targets = [side_address(fetched), side_address(driven)]
    with Prometheus(binary, tmp_path_factory.mktemp("prometheus"), targets) as prom:
        yield prom


def exported(server: BackgroundServer) -> dict[str, set[str]]:
    """Every sample name of the server's /metrics, with the label names it carries."""
    with urllib.request.urlopen(f"http://{side_address(server)}/metrics", timeout=10) as response:
        text = response.read().decode()
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def shipped_exprs(instance: str = ".*") -> list[tuple[str, str]]:
    """(where, expr) of every dashboard target and variable and every rule, Grafana variables substituted."""
    variables = {"datasource": "prometheus", "job": JOB, "instance": instance}
    dashboard = json.loads(DASHBOARD.read_text())
    found = dashboard_exprs(dashboard) + rule_exprs(yaml.safe_load(RULES.read_text()))
    return [(where, substitute(expr, variables)) for where, expr in found]


def test_a_scrape_counts_a_known_fetch(prometheus: Prometheus, fetched: BackgroundServer) -> None:
    instance = side_address(fetched)
    on = f'job="{JOB}",instance="{instance}"'
    with WeightClient(fetched.address) as client:
        client.fetch_state_dict(MODEL)
        first = client.last_stats
        fetched_at = time.time()
        assert first is not None
        prometheus.wait_for_scrape(instance, after=fetched_at)
        sent = f'weightserve_sent_bytes_total{{{on},model="{MODEL}",layout="checkpoint"}}'
        assert prometheus.value(sent) == first.bytes_received  # the message bytes the client took
        ok = f'sum(grpc_server_handled_total{{{on},grpc_method="FetchShard",grpc_code="OK"}})'
        assert prometheus.value(ok) >= 1
        hits = f"weightserve_cache_hits_total{{{on}}}"
        assert prometheus.value(hits) == 0  # a cold cache: every chunk read from the file
        assert prometheus.value(f"weightserve_cache_misses_total{{{on}}}") > 0

        client.fetch_state_dict(MODEL)  # warm: the same chunks, from memory
        prometheus.wait_for_scrape(instance, after=time.time())
    assert prometheus.value(hits) > 0
    assert prometheus.value(sent) == 2 * first.bytes_received
    assert prometheus.value(f"weightserve_cache_budget_bytes{{{on}}}") == CACHE


def test_shipped_expressions_select_only_exported_metrics_and_labels(driven: BackgroundServer) -> None:
    series = {**exported(driven), **PROMETHEUS_SERIES}
    wrong = []
    for where, expr in shipped_exprs():
        for name, labels in selected(expr).items():
            if name not in series:
                wrong.append(f"{where}: {name} is not exported")
            elif unknown := labels - series[name] - TARGET_LABELS:
                wrong.append(f"{where}: {name} has no label {sorted(unknown)} (it has {sorted(series[name])})")
    assert not wrong, "\n".join(wrong)


def test_shipped_expressions_parse_in_prometheus(prometheus: Prometheus) -> None:
    refused = []
    for where, expr in shipped_exprs():
        try:
            prometheus.query(expr)
        except QueryError as e:
            refused.append(f"{where}: {e}")
    assert not refused, "\n".join(refused)


def test_every_dashboard_target_shows_data_for_a_driven_server(
    prometheus: Prometheus, driven: BackgroundServer
) -> None:
    """Catches label values no name check can (a `when="after"` spelt wrong selects nothing)."""
    instance = side_address(driven)
    prometheus.wait_for_scrape(instance, after=time.time())  # rates need two scrapes of each series
    variables = {"datasource": "prometheus", "job": JOB, "instance": instance}
    targets = [(w, substitute(e, variables)) for w, e in dashboard_exprs(json.loads(DASHBOARD.read_text()))]
    deadline = time.monotonic() + START_SECONDS
    while empty := [f"{where}: {expr}" for where, expr in targets if not prometheus.query(expr)]:
        assert time.monotonic() < deadline, "no series for:\n" + "\n".join(empty)
        time.sleep(POLL_SECONDS)


def test_the_dashboard_is_importable_as_shipped() -> None:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["id"] is None
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["job"]["current"]["value"] == JOB
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert [t["refId"] for t in panel["targets"]] == [chr(ord("A") + i) for i in range(len(panel["targets"]))]


def test_expression_names_are_read_past_functions_keywords_and_labels() -> None:
    expr = (
        'sum by (model, le) (rate(a_bucket{job="x",grpc_code!="OK"}[5m] offset 1h)) / on (job) '
        'group_left (instance) b > bool 1e-3 and histogram_quantile(0.5, c{when="sum(d)"}) unless {job="e"}'
    )
    assert selected(expr) == {"a_bucket": {"job", "grpc_code"}, "b": set(), "c": {"when"}}
    assert substitute("rate(x{j=~'$job'}[$__rate_interval]) ${job} [[job]]", {"job": "w"}) == (
        "rate(x{j=~'w'}[1m]) w w"
    )
    with pytest.raises(KeyError, match=r"\$model"):
        substitute('x{model="$model"}', {})


@pytest.mark.parametrize("args", [("check", "rules", RULES), ("test", "rules", RULES_TEST)], ids=["check", "test"])
def test_promtool_accepts_the_rules(args: tuple[str, str, Path]) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("`promtool` is not on PATH (Debian's prometheus package has it)")
    result = subprocess.run([promtool, *map(str, args)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_exported_family_is_documented(driven: BackgroundServer) -> None:
    """observability.md lists every metric: an operator reads it, not the code."""
    documented = (REPO / "docs" / "observability.md").read_text()
    families = {re.sub(r"_(bucket|count|sum)$", "", name) for name in exported(driven)}
    missing = sorted(f for f in families if f.startswith("weightserve_") and f"`{f}" not in documented)
    assert not missing, f"exported but not in docs/observability.md: {missing}"
