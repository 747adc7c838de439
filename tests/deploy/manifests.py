"""Rendering deploy/k8s with kubectl, and what the tests read from the rendered objects.

The memory formula here is docs/deployment.md's ("Memory"); the tests hold every server
workload's limit to it, from the settings in its own ConfigMap.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from weightserve.config import ServerConfig, parse_setting, reserved_bytes, setting_names

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("base", "overlays/tls", "overlays/s3-cache", "overlays/node-local", "overlays/fleet")
"""Every kustomization that deploys a server; deploy/k8s/examples deploys workers."""
KUBECTL_MIN = (1, 27)
"""kustomize in kubectl 1.27+ (v5) renders components and `labels` as the manifests use them."""
SERVER_KINDS = ("Deployment", "StatefulSet", "DaemonSet")

_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)([KMGTPE]i?|m)?$")
_FACTORS = {
    None: 1,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
}
MiB = 2**20


def quantity(text: str | int) -> int:
    """Bytes of a Kubernetes quantity: '8720Mi', '32Gi', '0'."""
    match = _QUANTITY.match(str(text))
    assert match and match.group(2) in _FACTORS, f"{text!r} is no byte quantity"
    return int(float(match.group(1)) * _FACTORS[match.group(2)])


@cache
def kubectl() -> str:
    """The kubectl binary, 1.27 or later; skips the calling test (saying why) otherwise."""
    binary = shutil.which("kubectl")
    if binary is None:
        pytest.skip("kubectl is not installed (apt-get install kubectl); deploy/k8s cannot be rendered")
    out = subprocess.run([binary, "version", "--client", "-o", "json"], capture_output=True, text=True, check=False)
    version = json.loads(out.stdout or "{}").get("clientVersion", {})
    found = (int(version.get("major", 0)), int(re.sub(r"\D.*", "", version.get("minor", "0")) or 0))
    if found < KUBECTL_MIN:
        pytest.skip(f"kubectl {found[0]}.{found[1]} is older than 1.27: its kustomize cannot render deploy/k8s")
    return binary


@cache
def render(path: str) -> tuple[dict[str, Any], ...]:
    """The objects `kubectl kustomize deploy/k8s/PATH` renders (offline: kustomize reads only files)."""
    out = subprocess.run([kubectl(), "kustomize", str(K8S / path)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def objects(path: str, kind: str) -> list[dict[str, Any]]:
    return [o for o in render(path) if o["kind"] == kind]


def one(path: str, kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects(path, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{path}: {len(found)} {kind} named {name}"
    return found[0]


def server(path: str) -> dict[str, Any]:
    """The one server workload (Deployment, StatefulSet or DaemonSet) an overlay renders."""
    found = [o for o in render(path) if o["kind"] in SERVER_KINDS and o["metadata"]["name"] == "weightserve"]
    assert len(found) == 1, f"{path}: {[o['kind'] for o in found]} server workloads, want one"
    return found[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def container(workload: dict[str, Any], name: str = "weightserve") -> dict[str, Any]:
    found = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    assert len(found) == 1, f"no container {name}"
    return found[0]


def all_containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod.get("initContainers", [])
    yield from pod["containers"]


def config_text(path: str, workload: dict[str, Any]) -> str:
    """The weightserve.toml the server container's --config names, from the ConfigMap it mounts."""
    args = container(workload)["args"]
    config_path = Path(args[args.index("--config") + 1])
    volume = volume_at(workload, config_path)
    config_map = one(path, "ConfigMap", volume["configMap"]["name"])
    text: str = config_map["data"][config_path.name]
    return text


def volume_at(workload: dict[str, Any], path: Path, name: str = "weightserve") -> dict[str, Any]:
    """The volume the container mounts at the directory holding `path` (or at `path` itself)."""
    mounts = {Path(m["mountPath"]): m["name"] for m in container(workload, name).get("volumeMounts", [])}
    for mount, volume_name in mounts.items():
        if path == mount or mount in path.parents:
            volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
            if volume_name in volumes:
                return volumes[volume_name]
            claims = workload["spec"].get("volumeClaimTemplates", [])
            return next(c for c in claims if c["metadata"]["name"] == volume_name)
    raise AssertionError(f"nothing is mounted at {path} (mounts: {sorted(map(str, mounts))})")


def writable_mount(workload: dict[str, Any], path: Path) -> bool:
    """Whether the server container mounts a writable volume at or above `path`."""
    for mount in container(workload).get("volumeMounts", []):
        where = Path(mount["mountPath"])
        if (path == where or where in path.parents) and not mount.get("readOnly", False):
            return True
    return False


def server_config(text: str, **flags: Any) -> ServerConfig:
    """The ServerConfig a server builds from this file and these flags (typed), with no WEIGHTSERVE_* variables."""
    values = tomllib.loads(text)
    unknown = set(values) - set(setting_names())
    assert not unknown, f"keys that are no setting: {sorted(unknown)}"
    return ServerConfig.from_env({}, file_values=values, file_name="weightserve.toml", **flags)


def dockerfile_user() -> tuple[int, int]:
    """(uid, gid) of the image's last USER instruction."""
    users = re.findall(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(encoding="utf-8"), re.M)
    assert users, "USER uid:gid, numeric"
    return int(users[-1][0]), int(users[-1][1])


def dockerfile_env(name: str) -> str:
    """An ENV value of the Dockerfile's runtime stage (the server image's)."""
    runtime = (ROOT / "Dockerfile").read_text(encoding="utf-8").rpartition("\nFROM ")[2]
    match = re.search(rf"\b{name}=(\S+)", runtime)
    assert match, f"the runtime stage sets no {name}"
    return match.group(1)


@dataclass(frozen=True)
class MemoryTerms:
    """docs/deployment.md's terms of a server pod's memory limit, in bytes."""

    cache_memory: int
    read_pool: int
    baseline: int
    held_segments: int

    @property
    def limit(self) -> int:
        return self.cache_memory + self.read_pool + self.baseline + self.held_segments


def memory_terms(config: ServerConfig, workload: dict[str, Any]) -> MemoryTerms:
    """The formula's terms: the budget and the read pool from the configuration, the rest
    from the workload's weightserve/process-baseline and weightserve/held-segments annotations."""
    annotations = workload["metadata"].get("annotations", {})
    read_pool = reserved_bytes(config.read_threads, config.chunk_bytes) - reserved_bytes(0, config.chunk_bytes)
    return MemoryTerms(
        cache_memory=config.cache_memory,
        read_pool=read_pool,
        baseline=quantity(annotations["weightserve/process-baseline"]),
        held_segments=quantity(annotations["weightserve/held-segments"]),
    )


def ceil_mib(size: int) -> int:
    return math.ceil(size / MiB) * MiB


def port_of(address: str) -> int:
    return int(parse_setting("listen", address).rpartition(":")[2])
