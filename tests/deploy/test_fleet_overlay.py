"""deploy/k8s/overlays/fleet: replicas coordinated through Redis, filling each other over TLS, warmed by a Job.

The rendered objects are checked against each other and against the code (the Redis URL
against the Redis Service, the advertised address against the pod's IP and gRPC port, the
peer TLS variables against the Certificate and its Secret, the NetworkPolicies against
the pods they admit, the prefetch Job's arguments against `weightserve prefetch`). Then two
real servers run with the overlay's own arguments and variables (a real redis-server, an
S3 origin, a certificate naming only the headless Service, a `replica = true` token), and
the prefetch Job's command warms them: one downloads the model, the other fills from it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from tests.deploy.manifests import (
    all_containers,
    config_text,
    container,
    objects,
    one,
    pod_spec,
    render,
    server,
    tomllib,
)
from tests.deploy.test_manifests import selects, serve_config
from tests.deploy.test_server_config import free_port, status
from tests.fleet.conftest import redis_url, s3_origin  # noqa: F401 - the real redis-server and S3 origin fixtures
from tests.fleet.test_fleet_metrics import scrape, value
from tests.integration.faultkit import MID_LLAMA, FaultProxy
from weightserve.cli import build_parser
from weightserve.cli.fetch import run_prefetch
from weightserve.config import FILE_SETTINGS
from weightserve.config_file import dump_settings
from weightserve.testing import make_ca, make_leaf, write_llama_checkpoint

FLEET = "overlays/fleet"
PREFETCH = "overlays/fleet/prefetch"
REDIS_LABELS = {"app.kubernetes.io/name": "weightserve-redis", "app.kubernetes.io/component": "coordination"}


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def namespace() -> str:
    ns: str = server(FLEET)["metadata"]["namespace"]
    return ns


def grpc_port() -> int:
    ports = {p["name"]: p["containerPort"] for p in container(server(FLEET))["ports"]}
    return int(ports["grpc"])


def headless_name() -> str:
    headless = one(FLEET, "Service", "weightserve-headless")
    assert headless["spec"]["clusterIP"] == "None"
    return f"weightserve-headless.{namespace()}.svc"


def secret_file(workload: dict[str, Any], container_name: str, path: Path) -> tuple[str, str]:
    """(Secret, key) of the file a container reads at `path`, from the Secret volume mounted there."""
    c = next(c for c in pod_spec(workload)["containers"] if c["name"] == container_name)
    for mount in c["volumeMounts"]:
        if Path(mount["mountPath"]) == path.parent:
            volume = next(v for v in pod_spec(workload)["volumes"] if v["name"] == mount["name"])
            items = {item["path"]: item["key"] for item in volume["secret"]["items"]}
            return volume["secret"]["secretName"], items[path.name]
    raise AssertionError(f"{container_name} mounts nothing at {path.parent}")


def admitted_ports(labels: dict[str, str]) -> set[str]:
    """The server ports the fleet's ingress policy admits pods with `labels` (in any namespace) to."""
    ports: set[str] = set()
    for rule in one(FLEET, "NetworkPolicy", "weightserve")["spec"]["ingress"]:
        for peer in rule["from"]:
            if peer.get("namespaceSelector") == {} and selects(peer["podSelector"]["matchLabels"], labels):
                ports.update(p["port"] for p in rule["ports"])
    return ports


# ----------------------------------------------------------------- the rendered objects


def test_servers_coordinate_through_the_redis_service_and_advertise_the_pod_ip() -> None:
    config = serve_config(FLEET)
    redis_service = one(FLEET, "Service", "weightserve-redis")
    redis = one(FLEET, "Deployment", "weightserve-redis")
    url = urlparse(config.coordination)
    assert (url.scheme, url.hostname) == ("redis", "weightserve-redis")
    (service_port,) = redis_service["spec"]["ports"]
    assert url.port == service_port["port"] == 6379
    assert selects(redis_service["spec"]["selector"], redis["spec"]["template"]["metadata"]["labels"])
    redis_ports = {p["name"]: p["containerPort"] for p in container(redis, "redis")["ports"]}
    assert redis_ports[service_port["targetPort"]] == 6379
    env = env_of(container(server(FLEET)))
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert config.advertise == f"$(POD_IP):{grpc_port()}", "Kubernetes expands $(POD_IP) in args"
    assert config.listen.endswith(f":{grpc_port()}")
    assert any(source.startswith("s3://") for source in config.allow_source), "a remote origin to coordinate"
    assert config.disk_cache_dir is not None and config.disk_cache_bytes > 0


def test_control_calls_and_prefetch_share_the_data_port_the_fleet_client_routes_by() -> None:
    assert serve_config(FLEET).control_listen == ""
    for service in objects(FLEET, "Service"):
        assert 50052 not in {p["port"] for p in service["spec"]["ports"]}, service["metadata"]["name"]
    assert "control" not in {p["name"] for p in container(server(FLEET))["ports"]}


def test_the_replica_token_and_the_peer_tls_settings_match_the_certificate() -> None:
    workload = server(FLEET)
    env = env_of(container(workload))
    token = env["WEIGHTSERVE_REPLICA_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token == {"name": "weightserve-replica", "key": "token"}
    (certificate,) = objects(FLEET, "Certificate")
    assert {"server auth", "client auth"} <= set(certificate["spec"]["usages"]), "a replica is a client under mTLS"
    ca = Path(env["WEIGHTSERVE_TLS_CA"]["value"])
    assert secret_file(workload, "weightserve", ca) == (certificate["spec"]["secretName"], "ca.crt")
    name = env["WEIGHTSERVE_REPLICA_SERVER_NAME"]["value"]
    assert name == headless_name() and name in certificate["spec"]["dnsNames"]
    for service in ("weightserve", "weightserve-headless"):
        assert f"{service}.{namespace()}.svc" in certificate["spec"]["dnsNames"]
    config = serve_config(FLEET)
    assert config.tls_cert is not None and config.tls_key is not None


def test_network_policies_admit_replicas_to_redis_and_to_each_other_only() -> None:
    workload = server(FLEET)
    server_labels = workload["spec"]["template"]["metadata"]["labels"]
    redis_labels = one(FLEET, "Deployment", "weightserve-redis")["spec"]["template"]["metadata"]["labels"]
    guard = one(FLEET, "NetworkPolicy", "weightserve-redis")
    assert selects(guard["spec"]["podSelector"]["matchLabels"], redis_labels)
    assert guard["spec"]["policyTypes"] == ["Ingress", "Egress"] and guard["spec"]["egress"] == []
    (rule,) = guard["spec"]["ingress"]
    (peer,) = rule["from"]
    assert "namespaceSelector" not in peer and selects(peer["podSelector"]["matchLabels"], server_labels)
    assert [(p["port"], p["protocol"]) for p in rule["ports"]] == [("redis", "TCP")]

    egress = one(FLEET, "NetworkPolicy", "weightserve-egress")
    assert selects(egress["spec"]["podSelector"]["matchLabels"], server_labels)
    assert egress["spec"]["policyTypes"] == ["Egress"]
    reach: dict[str, set[int]] = {}
    for rule in egress["spec"]["egress"]:
        ports = {int(p["port"]) for p in rule["ports"]}
        for peer in rule.get("to", [{}]):
            labels = peer.get("podSelector", {}).get("matchLabels", {})
            who = (
                "redis"
                if selects(labels, redis_labels)
                else "replica"
                if selects(labels, server_labels)
                else "dns"
                if labels == {"k8s-app": "kube-dns"}
                else "anywhere"
                if not peer
                else "?"
            )
            reach.setdefault(who, set()).update(ports)
    assert reach == {"dns": {53}, "redis": {6379}, "replica": {grpc_port()}, "anywhere": {443}}
    replica_ports = {
        port["port"]
        for rule in one(FLEET, "NetworkPolicy", "weightserve")["spec"]["ingress"]
        for peer in rule["from"]
        if "namespaceSelector" not in peer and selects(peer["podSelector"]["matchLabels"], server_labels)
        for port in rule["ports"]
    }
    assert replica_ports == {"grpc"}, "replicas reach each other's gRPC port (replica fill), in their namespace"


def test_redis_pod_is_hardened_and_bounded() -> None:
    redis = one(FLEET, "Deployment", "weightserve-redis")
    pod = pod_spec(redis)
    assert pod["enableServiceLinks"] is False and pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in all_containers(pod):
        security = c["securityContext"]
        assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"]
        assert "memory" in c["resources"]["limits"]
    args = container(redis, "redis")["args"]
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no", "nothing persisted"
    (namespace_object,) = objects(FLEET, "Namespace")
    assert namespace_object["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_prefetch_job_warms_the_fleet_over_the_headless_service() -> None:
    (job,) = objects(PREFETCH, "Job")
    assert job["metadata"]["namespace"] == namespace()
    c = container(job, "prefetch")
    args = build_parser().parse_args(c["args"])
    assert args.run is run_prefetch and args.wait and args.world_size >= 1
    assert args.server == f"dns:///{headless_name()}:{grpc_port()}"
    assert admitted_ports(job["spec"]["template"]["metadata"]["labels"]) == {"grpc"}
    env = env_of(c)
    assert env["WEIGHTSERVE_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "weightserve-prefetch"
    (certificate,) = objects(FLEET, "Certificate")
    ca = Path(env["WEIGHTSERVE_TLS_CA"]["value"])
    assert secret_file(job, "prefetch", ca) == (certificate["spec"]["secretName"], "ca.crt")
    pod = pod_spec(job)
    assert pod["restartPolicy"] == "Never" and pod["enableServiceLinks"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    security = c["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["capabilities"]["drop"] == ["ALL"]


def test_prefetch_job_validates_strictly() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    from tests.deploy.test_validation import KUBERNETES_VERSION

    docs = render(PREFETCH)
    assert [d["kind"] for d in docs] == ["Job"]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


# ------------------------------------------------------- real servers with the overlay's arguments


def _token(*flags: str) -> tuple[str, str]:
    """(secret, [[tokens]] entry) from `weightserve token`, as an operator makes them."""
    out = subprocess.run(
        [sys.executable, "-m", "weightserve.cli", "token", *flags], capture_output=True, text=True, check=True
    )
    secret, _, entry = out.stdout.partition("\n")
    return secret, entry


class Replica:
    """`weightserve serve` with the overlay container's arguments and variables, paths moved under `tmp`."""

    def __init__(self, index: int, tmp: Path, redis: str, tokens: Path, secrets: dict[str, str]) -> None:
        workload = server(FLEET)
        c = container(workload)
        self.port, self.metrics = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        values = tomllib.loads(config_text(FLEET, workload))
        models = tmp / "models"
        models.mkdir(exist_ok=True)
        values.update(
            model_roots=[str(models)], disk_cache_dir=str(tmp / f"disk-{index}"), auth_tokens=str(tokens),
            metrics_listen=f"127.0.0.1:{self.metrics}", listen=self.address,
        )  # fmt: skip
        config = tmp / f"weightserve-{index}.toml"
        config.write_text(dump_settings(values, plain=FILE_SETTINGS))
        argv = list(c["args"])
        argv[argv.index("--config") + 1] = str(config)
        for flag in ("--tls-cert", "--tls-key"):
            argv[argv.index(flag) + 1] = str(tmp / "tls" / Path(argv[argv.index(flag) + 1]).name)
        argv[argv.index("--coordination") + 1] = redis  # a real redis-server in place of the Service
        env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSERVE_")}
        for variable in c["env"]:
            name = variable["name"]
            if "value" in variable:  # a file mounted under /etc/weightserve/<dir> lives in tmp/<dir>
                value = variable["value"]
                env[name] = str(tmp / Path(value).parent.name / Path(value).name) if value.startswith("/") else value
            elif "fieldRef" in variable.get("valueFrom", {}):
                assert variable["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
                env[name] = "127.0.0.1"
            elif (ref := variable["valueFrom"].get("secretKeyRef")) and ref["name"] in secrets:
                env[name] = secrets[ref["name"]]
        advertise = argv.index("--advertise") + 1  # Kubernetes' $(VAR) expansion; the pod's port is ours here
        expanded = argv[advertise].replace("$(POD_IP)", env["POD_IP"])
        argv[advertise] = expanded.replace(f":{grpc_port()}", f":{self.port}")
        self.log = (tmp / f"server-{index}.log").open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "weightserve.cli", *argv], env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while status(f"http://127.0.0.1:{self.metrics}/readyz") != 200:
            assert self.process.poll() is None, f"the server exited: {Path(self.log.name).read_text()}"
            assert time.monotonic() < deadline, "not ready within 60 s"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.log.close()


@pytest.mark.timeout(180)
def test_the_overlays_servers_fill_each_other_over_tls_when_the_prefetch_job_runs(
    tmp_path: Path,
    redis_url: str,  # noqa: F811 - the fixture imported above
    s3_origin: FaultProxy,  # noqa: F811
) -> None:
    import boto3

    (job,) = objects(PREFETCH, "Job")
    job_argv = list(container(job, "prefetch")["args"])
    model = job_argv[job_argv.index("prefetch") + 1]
    bucket, _, prefix = model.removeprefix("s3://").partition("/")
    local = tmp_path / "origin"
    write_llama_checkpoint(local, MID_LLAMA, num_files=2)
    s3 = boto3.client("s3", endpoint_url=f"http://{s3_origin.address}", region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    for path in sorted(local.iterdir()):
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{path.name}", Body=path.read_bytes())
    weight_bytes = sum(p.stat().st_size for p in local.glob("*.safetensors"))

    ca = make_ca()
    service = headless_name()
    leaf = make_leaf(ca, service, dns=(service, f"*.{service}"), ips=(), also_client=True)  # no IP: dialled by IP
    leaf.write(tmp_path / "tls", "tls")
    (tmp_path / "tls-ca").mkdir()
    (tmp_path / "tls-ca" / "ca.crt").write_bytes(ca.cert)
    replica_secret, replica_entry = _token("--name", "replicas", "--models", "**", "--replica")
    prefetch_secret, prefetch_entry = _token("--name", "prefetch", "--models", "**", "--cache")
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(replica_entry + prefetch_entry)

    replicas = [Replica(i, tmp_path, redis_url, tokens, {"weightserve-replica": replica_secret}) for i in range(2)]
    try:
        for replica in replicas:
            replica.wait_ready()
        before = s3_origin.s2c_bytes
        job_argv[job_argv.index("--server") + 1] = ",".join(r.address for r in replicas)
        env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSERVE_")}
        env |= {"WEIGHTSERVE_TOKEN": prefetch_secret, "WEIGHTSERVE_TLS_CA": str(tmp_path / "tls-ca" / "ca.crt")}
        prefetch = subprocess.run(
            [sys.executable, "-m", "weightserve.cli", *job_argv, "--tls-server-name", service],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert prefetch.returncode == 0, prefetch.stdout + prefetch.stderr
        metrics = [scrape(f"127.0.0.1:{r.metrics}") for r in replicas]
        fills = {
            source: sum(value(m, "weightserve_fleet_fills_total", source=source) for m in metrics)
            for source in ("origin", "replica")
        }
        assert fills == {"origin": 1, "replica": 1}, "one replica downloads, the other fills from it"
        sent = sum(value(m, "weightserve_replica_fill_sent_bytes_total") for m in metrics)
        assert sent == sum(value(m, "weightserve_fleet_fill_bytes_total", source="replica") for m in metrics) > 0
        assert s3_origin.s2c_bytes - before < 2 * weight_bytes, "the origin sent the weights once"
    finally:
        for replica in replicas:
            replica.stop()
