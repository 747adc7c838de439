"""deploy/k8s rendered by `kubectl kustomize`: what each server pod must be, checked against the code.

Ports, probe paths, flags, variables and configuration keys in the manifests are looked
up in weightserve itself (the parser, ServerConfig, the side port's handler), so a
rename there fails here instead of in a cluster.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.manifests import (
    OVERLAYS,
    all_containers,
    ceil_mib,
    config_text,
    container,
    dockerfile_env,
    dockerfile_user,
    memory_terms,
    objects,
    one,
    pod_spec,
    port_of,
    quantity,
    render,
    server,
    server_config,
    volume_at,
    writable_mount,
)
from weightserve.cli import build_parser
from weightserve.cli.serve import run_serve
from weightserve.config import OTHER_VARIABLES, ServerConfig, parse_setting, setting_variables
from weightserve.server import http_endpoints
from weightserve.server.build import metrics_address
from weightserve.server.fd_handoff import handoff_path

SERVER_LABELS = {"app.kubernetes.io/name": "weightserve", "app.kubernetes.io/component": "server"}
PART_OF = {"app.kubernetes.io/part-of": "weightserve"}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def serve_config(path: str) -> ServerConfig:
    """The server's configuration: its ConfigMap's file, then the flags its container passes."""
    workload = server(path)
    args = build_parser().parse_args(container(workload)["args"])
    assert args.run is run_serve
    given = {name: getattr(args, name) for name in args.setting_flags if getattr(args, name) is not None}
    flags = {name: parse_setting(name, raw) for name, raw in given.items()}
    return server_config(config_text(path, workload), **flags)


def container_ports(workload: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container(workload).get("ports", [])}


@pytest.mark.parametrize("path", OVERLAYS)
def test_configuration_is_one_the_server_accepts(path: str) -> None:
    config = serve_config(path)
    ports = container_ports(server(path))
    assert metrics_address(config) == ("0.0.0.0", ports["metrics"]), "probes and Prometheus reach the pod's IP"
    if config.listen.startswith("unix:"):
        assert "grpc" not in ports
    else:
        assert port_of(config.listen) == ports["grpc"]
    if config.control_listen:
        assert port_of(config.control_listen) == ports["control"]
    else:  # a fleet: control calls share the data port (overlays/fleet/kustomization.yaml says why)
        assert "control" not in ports
    assert config.auth_tokens is not None, "tokens on every deployment"
    assert volume_at(server(path), config.auth_tokens)["secret"]["secretName"] == "weightserve-tokens"
    assert config.cache_memory > 0, "a memory budget bounds the process"


@pytest.mark.parametrize("path", OVERLAYS)
def test_pod_is_hardened(path: str) -> None:
    workload = server(path)
    pod = pod_spec(workload)
    assert pod["enableServiceLinks"] is False
    assert pod["automountServiceAccountToken"] is False
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True
    assert (context["runAsUser"], context["runAsGroup"]) == dockerfile_user(), "the image's own user"
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in all_containers(pod):
        security = c["securityContext"]
        assert security["allowPrivilegeEscalation"] is False, c["name"]
        assert security["readOnlyRootFilesystem"] is True, c["name"]
        assert security["capabilities"]["drop"] == ["ALL"], c["name"]
        if security.get("runAsUser") == 0:  # node-local's chown of the socket directory, and nothing else
            assert c in pod.get("initContainers", []) and security["capabilities"]["add"] == ["CHOWN"], c["name"]
        else:
            assert security.get("runAsNonRoot", context["runAsNonRoot"]) is True, c["name"]
        assert "memory" in c["resources"]["limits"], c["name"]


@pytest.mark.parametrize("path", OVERLAYS)
def test_writable_paths_are_volumes(path: str) -> None:
    """/tmp, HF_HOME (the image's) and the disk cache are mounted volumes on a read-only root."""
    workload = server(path)
    config = serve_config(path)
    hf_home = Path(dockerfile_env("HF_HOME"))
    for path_needed in (Path("/tmp"), hf_home, config.disk_cache_dir):
        assert path_needed is not None
        assert writable_mount(workload, path_needed), f"{path_needed} needs a writable volume"
        volume = volume_at(workload, path_needed)
        assert "emptyDir" in volume or "spec" in volume, f"{path_needed}: an emptyDir or a claim, not {volume}"


@pytest.mark.parametrize("path", OVERLAYS)
def test_probes_are_http_on_the_metrics_port_and_paths_the_server_answers(path: str) -> None:
    c = container(server(path))
    source = inspect.getsource(http_endpoints)
    expected = {"startupProbe": "/livez", "readinessProbe": "/readyz", "livenessProbe": "/livez"}
    for probe, probe_path in expected.items():
        get = c[probe]["httpGet"]
        assert get["path"] == probe_path and f'"{probe_path}"' in source, probe
        assert get["port"] == "metrics" and get.get("scheme", "HTTP") == "HTTP", probe


@pytest.mark.parametrize("path", OVERLAYS)
def test_termination_outlasts_the_pre_stop_sleep_and_the_drain(path: str) -> None:
    workload = server(path)
    sleep = container(workload)["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and int(sleep[1]) >= 5, "endpoints drop the pod before it drains"
    grace = serve_config(path).grace_seconds
    assert pod_spec(workload)["terminationGracePeriodSeconds"] > int(sleep[1]) + grace


@pytest.mark.parametrize("path", OVERLAYS)
def test_memory_limit_follows_the_documented_formula(path: str) -> None:
    workload = server(path)
    resources = container(workload)["resources"]
    terms = memory_terms(serve_config(path), workload)
    limit = quantity(resources["limits"]["memory"])
    assert limit == ceil_mib(terms.limit), f"{path}: limit {limit} vs formula {terms}"
    assert quantity(resources["requests"]["memory"]) == limit, "requests = limits: no overcommit of the budget"
    assert terms.baseline >= 256 * 2**20, "the process baseline covers Python, torch and grpc (~250 MiB measured)"


def test_node_local_limit_counts_the_segments_workers_hold() -> None:
    terms = memory_terms(serve_config("overlays/node-local"), server("overlays/node-local"))
    assert terms.held_segments > 0
    assert memory_terms(serve_config("base"), server("base")).held_segments == 0


@pytest.mark.parametrize("path", OVERLAYS)
def test_environment_names_exist(path: str) -> None:
    known = set(setting_variables()) | set(OTHER_VARIABLES)
    for c in all_containers(pod_spec(server(path))):
        for variable in c.get("env", []):
            if variable["name"].startswith("WEIGHTSERVE_"):
                assert variable["name"] in known, variable["name"]


@pytest.mark.parametrize("path", OVERLAYS)
def test_spread_across_nodes(path: str) -> None:
    workload = server(path)
    if workload["kind"] == "DaemonSet":
        return  # one per node by construction
    constraints = pod_spec(workload)["topologySpreadConstraints"]
    by_key = {c["topologyKey"]: c for c in constraints}
    host = by_key["kubernetes.io/hostname"]
    assert host["maxSkew"] == 1 and host["whenUnsatisfiable"] == "DoNotSchedule"
    assert selects(host["labelSelector"]["matchLabels"], workload["spec"]["template"]["metadata"]["labels"])


@pytest.mark.parametrize("path", OVERLAYS)
def test_services_route_to_the_server_ports(path: str) -> None:
    workload = server(path)
    labels = workload["spec"]["template"]["metadata"]["labels"]
    ports = container_ports(workload)
    services = [s for s in objects(path, "Service") if s["metadata"]["labels"] == SERVER_LABELS | PART_OF]
    assert services
    for service in services:
        assert selects(service["spec"]["selector"], labels), service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{service['metadata']['name']}: {port}"
            assert port["appProtocol"] == ("http" if port["name"] == "metrics" else "grpc"), port
    names = {s["metadata"]["name"]: s for s in services}
    if "weightserve-headless" in names:
        assert names["weightserve-headless"]["spec"]["clusterIP"] == "None"
        assert {p["name"] for p in names["weightserve"]["spec"]["ports"]} >= {"grpc", "metrics"}
    else:
        assert path == "overlays/node-local", "only node-local's clients use a socket instead"


@pytest.mark.parametrize("path", OVERLAYS)
def test_disruption_budget(path: str) -> None:
    workload = server(path)
    budgets = objects(path, "PodDisruptionBudget")
    if workload["kind"] == "DaemonSet":  # maxUnavailable needs a scale subresource
        assert budgets == []
        assert workload["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 1
        return
    (budget,) = budgets
    assert budget["spec"]["maxUnavailable"] == 1
    assert selects(budget["spec"]["selector"]["matchLabels"], workload["spec"]["template"]["metadata"]["labels"])
    if workload["kind"] == "Deployment":
        assert workload["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, "roll without losing capacity"


@pytest.mark.parametrize("path", OVERLAYS)
def test_network_policy_admits_each_caller_to_its_port_only(path: str) -> None:
    workload = server(path)
    labels = workload["spec"]["template"]["metadata"]["labels"]
    ports = container_ports(workload) | {"grpc": 50051}
    control = "control" if "control" in ports else "grpc"  # a fleet serves control calls on the data port
    policy = one(path, "NetworkPolicy", "weightserve")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], labels)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    admitted: dict[str, set[str]] = {}
    for rule in policy["spec"]["ingress"]:
        for peer in rule["from"]:
            peer_labels = peer["podSelector"]["matchLabels"]
            who = (
                "replica"
                if selects(peer_labels, labels)
                else "prometheus"
                if "namespaceSelector" in peer and peer["namespaceSelector"].get("matchLabels")
                else peer_labels.get("weightserve/access", "?")
            )
            admitted.setdefault(who, set()).update(p["port"] for p in rule["ports"])
        assert all(p["port"] in ports for p in rule["ports"]), rule
    assert admitted == {
        "data": {"grpc"},
        "control": {control},
        "replica": {"grpc", control},
        "prometheus": {"metrics"},
    }


@pytest.mark.parametrize("path", OVERLAYS)
def test_service_monitor_scrapes_the_metrics_port(path: str) -> None:
    (monitor,) = objects(path, "ServiceMonitor")
    endpoints = monitor["spec"]["endpoints"]
    assert [(e["port"], e["path"]) for e in endpoints] == [("metrics", "/metrics")]
    services = [
        s
        for s in objects(path, "Service")
        if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    with_port = [s for s in services if "metrics" in {p["name"] for p in s["spec"]["ports"]}]
    assert len(with_port) == 1, "each pod is scraped once"


@pytest.mark.parametrize("path", ["overlays/tls", "overlays/s3-cache"])
def test_tls_certificate_names_the_services_and_the_server_uses_it(path: str) -> None:
    (certificate,) = objects(path, "Certificate")
    names = set(certificate["spec"]["dnsNames"])
    namespace = certificate["metadata"]["namespace"]
    for service in objects(path, "Service"):
        assert f"{service['metadata']['name']}.{namespace}.svc" in names, service["metadata"]["name"]
    workload = server(path)
    if workload["kind"] == "StatefulSet":
        pod = f"weightserve-0.{workload['spec']['serviceName']}.{namespace}.svc"
        assert "*." + pod.split(".", 1)[1] in names
    config = serve_config(path)
    assert config.tls_cert is not None and config.tls_key is not None
    for file in (config.tls_cert, config.tls_key):
        volume = volume_at(workload, file)
        assert volume["secret"]["secretName"] == certificate["spec"]["secretName"]
        assert file.name in {item["path"] for item in volume["secret"]["items"]}


def test_s3_cache_keeps_a_claim_per_replica_and_credentials_in_a_secret() -> None:
    path = "overlays/s3-cache"
    workload = server(path)
    assert workload["kind"] == "StatefulSet"
    assert workload["spec"]["serviceName"] == "weightserve-headless"
    config = serve_config(path)
    assert config.disk_cache_dir is not None
    claim = volume_at(workload, config.disk_cache_dir)
    assert claim["metadata"]["name"] in {t["metadata"]["name"] for t in workload["spec"]["volumeClaimTemplates"]}
    assert config.disk_cache_bytes < quantity(claim["spec"]["resources"]["requests"]["storage"])
    assert any(source.startswith("s3://") for source in config.allow_source)
    env = {e["name"]: e for e in container(workload)["env"]}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "weightserve-s3"
    assert objects(path, "Deployment") == []


def test_node_local_serves_a_socket_in_a_host_directory() -> None:
    path = "overlays/node-local"
    workload = server(path)
    assert workload["kind"] == "DaemonSet"
    config = serve_config(path)
    assert config.listen.startswith("unix:")
    socket = Path(config.listen.removeprefix("unix:"))
    volume = volume_at(workload, socket)
    assert volume["hostPath"]["path"] == str(socket.parent)
    side = handoff_path(config.listen)
    assert side is not None and side.parent == socket.parent, "the descriptor socket sits beside it"
    (init,) = pod_spec(workload)["initContainers"]
    assert init["command"] == [
        "chown",
        f"{pod_spec(workload)['securityContext']['runAsUser']}:10001",
        str(socket.parent),
    ]


@pytest.mark.parametrize("path", [*OVERLAYS, "examples"])
def test_renders_in_one_namespace_with_config_maps_referenced_by_their_hashed_names(path: str) -> None:
    docs = render(path)
    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert len(namespaces) == 1 and None not in namespaces, namespaces
    config_maps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            for volume in pod_spec(d).get("volumes", []):
                if "configMap" in volume:
                    assert volume["configMap"]["name"] in config_maps, volume


def test_every_overlay_deploys_the_one_server_name() -> None:
    assert {server(p)["kind"] for p in OVERLAYS} == {"Deployment", "StatefulSet", "DaemonSet"}
    assert one("base", "Deployment", "weightserve")["spec"]["replicas"] >= 2


@pytest.mark.parametrize("path", OVERLAYS)
def test_namespace_enforces_the_strictest_pod_security_level_its_pods_meet(path: str) -> None:
    (namespace,) = objects(path, "Namespace")
    level = namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
    pod = pod_spec(server(path))
    host_paths = [v for v in pod["volumes"] if "hostPath" in v]
    root = [c for c in all_containers(pod) if c["securityContext"].get("runAsUser") == 0]
    if host_paths or root:
        assert path == "overlays/node-local" and level == "privileged"
    else:
        assert level == "restricted"
