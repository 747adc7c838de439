"""deploy/k8s/examples (workers that take their weights from weightserve) and the plain
Prometheus scrape config: what they name must exist on the server's side and in the code."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.manifests import K8S, all_containers, objects, pod_spec, render
from weightserve.cli import build_parser
from weightserve.cli.fetch import run_fetch
from weightserve.client import WeightClient
from weightserve.client.common import FetchOptions
from weightserve.config import OTHER_VARIABLES, setting_variables

SERVER = "overlays/tls"
"""The examples use TLS and tokens, so they talk to this overlay's server."""


def workers() -> list[dict[str, Any]]:
    found = objects("examples", "Deployment")
    assert len(found) == 2
    return found


def server_policy_labels() -> dict[str, str]:
    (policy,) = objects(SERVER, "NetworkPolicy")
    for rule in policy["spec"]["ingress"]:
        if [p["port"] for p in rule["ports"]] == ["grpc"]:
            return dict(rule["from"][0]["podSelector"]["matchLabels"])
    raise AssertionError("no rule admits workers to the data port")


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def expand(arg: str, env: dict[str, dict[str, Any]]) -> str:
    """Kubernetes' $(VAR) expansion of an argument, from literal values."""
    for name, variable in env.items():
        if "value" in variable:
            arg = arg.replace(f"$({name})", variable["value"])
    return arg


def certificate_names() -> set[str]:
    (certificate,) = objects(SERVER, "Certificate")
    return set(certificate["spec"]["dnsNames"])


def test_workers_are_admitted_by_the_network_policy_and_have_no_service_links() -> None:
    labels = server_policy_labels()
    for worker in workers():
        pod = pod_spec(worker)
        assert pod["enableServiceLinks"] is False, worker["metadata"]["name"]
        template_labels = worker["spec"]["template"]["metadata"]["labels"]
        assert all(template_labels.get(k) == v for k, v in labels.items()), worker["metadata"]["name"]


def test_variables_are_ones_the_client_reads() -> None:
    known = set(setting_variables()) | set(OTHER_VARIABLES)
    for worker in workers():
        for c in all_containers(pod_spec(worker)):
            env = env_of(c)
            for name in env:
                assert not name.startswith("WEIGHTSERVE_") or name in known, name
            if any(name.startswith("WEIGHTSERVE_") for name in env):
                assert "WEIGHTSERVE_TLS_CA" in env and "WEIGHTSERVE_TOKEN" in env, "tokens travel only over TLS"


def test_init_container_fetches_the_rank_into_an_empty_dir_the_engine_reads() -> None:
    (worker,) = [w for w in workers() if pod_spec(w).get("initContainers")]
    pod = pod_spec(worker)
    (init,) = pod["initContainers"]
    env = env_of(init)
    argv = [expand(a, env) for a in init["args"]]
    args = build_parser().parse_args(argv)
    assert args.run is run_fetch
    assert args.server.rpartition(":")[0] in certificate_names(), "the name the server's certificate carries"
    assert int(args.server.rpartition(":")[2]) == 50051
    assert 0 <= args.rank < args.world_size
    volumes = {v["name"]: v for v in pod["volumes"]}
    (out,) = [m for m in init["volumeMounts"] if m["mountPath"] == args.out]
    assert "emptyDir" in volumes[out["name"]]
    engine_mounts = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
    assert out["name"] in engine_mounts, "the engine reads what the init container wrote"
    ca = Path(env["WEIGHTSERVE_TLS_CA"]["value"])
    (ca_mount,) = [m for m in init["volumeMounts"] if Path(m["mountPath"]) in ca.parents]
    assert ca.name in {i["path"] for i in volumes[ca_mount["name"]]["secret"]["items"]}


def test_python_worker_calls_the_client_as_it_is() -> None:
    (worker,) = [w for w in workers() if not pod_spec(w).get("initContainers")]
    pod = pod_spec(worker)
    (c,) = pod["containers"]
    script_path = Path(c["command"][-1])
    (config_map,) = [o for o in render("examples") if o["kind"] == "ConfigMap"]
    source = config_map["data"][script_path.name]
    assert source == (K8S / "examples" / script_path.name).read_text(encoding="utf-8")
    tree = ast.parse(source)
    fetch_params = set(inspect.signature(WeightClient.fetch_state_dict).parameters) | set(FetchOptions.__annotations__)
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "fetch_state_dict"
    ]
    assert calls, "the worker fetches its rank"
    for call in calls:
        assert {k.arg for k in call.keywords} <= fetch_params
    env = env_of(c)
    assert env["WEIGHTSERVE_SERVER"]["value"].rpartition(":")[0] in certificate_names()
    read = {
        node.slice.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
    }
    assert {name for name in read if isinstance(name, str) and name.isupper()} <= set(env)


def test_plain_prometheus_scrape_config_matches_the_service_and_the_rules() -> None:
    scrape = yaml.safe_load((K8S / "prometheus" / "scrape-config.yaml").read_text(encoding="utf-8"))
    (job,) = scrape["scrape_configs"]
    rules = (K8S.parent / "prometheus" / "rules.yaml").read_text(encoding="utf-8")
    assert f'job="{job["job_name"]}"' in rules, "the alert rules select this job"
    (sd,) = job["kubernetes_sd_configs"]
    (service,) = [s for s in objects("base", "Service") if s["metadata"]["name"] == "weightserve"]
    assert sd["namespaces"]["names"] == [service["metadata"]["namespace"]]
    keep = {r["source_labels"][0]: r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
    assert keep["__meta_kubernetes_service_name"] == service["metadata"]["name"]
    assert keep["__meta_kubernetes_endpointslice_port_name"] in {p["name"] for p in service["spec"]["ports"]}
    assert job["metrics_path"] == "/metrics"
