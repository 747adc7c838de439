"""Schema validation of everything deploy/k8s renders, offline.

Core objects: kubernetes-validate's bundled schemas of KUBERNETES_VERSION, strict (an
unknown field is an error, as `kubernetes-validate --strict` reports it). The
ServiceMonitor and the Certificate: the openAPIV3Schema of their CRDs, vendored in
deploy/k8s/crds with the release they came from, made strict the same way.
"""

from __future__ import annotations

import copy
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.manifests import K8S, OVERLAYS, render

KUBERNETES_VERSION = "1.32.0"
"""The API version the manifests are validated against (kubectl 1.32 renders them here)."""
CRDS = K8S / "crds"
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("cert-manager.io/v1", "Certificate"): "cert-manager.io_certificates.yaml",
}
RENDERED = (*OVERLAYS, "examples")

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (pip install kubernetes-validate, dev extra)"
)
jsonschema = pytest.importorskip("jsonschema")


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A structural CRD schema where an object with listed properties allows no others,
    unless it says it keeps unknown fields (what the API server prunes, refused here)."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@cache
def crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRDS / CUSTOM_KINDS[(api_version, kind)]).read_text(encoding="utf-8"))
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = strict(served["schema"]["openAPIV3Schema"])
    # metadata is the API server's ObjectMeta, which the CRD leaves open
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def validate_custom(obj: dict[str, Any]) -> None:
    schema = crd_schema(obj["apiVersion"], obj["kind"])
    jsonschema.validate(obj, schema, cls=jsonschema.Draft7Validator)


@pytest.mark.parametrize("path", RENDERED)
def test_core_objects_validate_strictly(path: str) -> None:
    checked = 0
    for obj in render(path):
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{path}: {obj['kind']}/{obj['metadata']['name']}: {e.message} at {list(e.path)}")
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("path", OVERLAYS)
def test_custom_resources_validate_against_their_crds(path: str) -> None:
    custom = [o for o in render(path) if (o["apiVersion"], o["kind"]) in CUSTOM_KINDS]
    kinds = {o["kind"] for o in custom}
    assert "ServiceMonitor" in kinds
    if path in ("overlays/tls", "overlays/s3-cache"):
        assert "Certificate" in kinds
    for obj in custom:
        validate_custom(obj)


def test_strict_validation_refuses_a_misspelt_field() -> None:
    """The controls: the same checks fail on a field that is not in the schema."""
    deployment = copy.deepcopy(next(o for o in render("base") if o["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    certificate = copy.deepcopy(next(o for o in render("overlays/tls") if o["kind"] == "Certificate"))
    certificate["spec"]["dnsName"] = certificate["spec"].pop("dnsNames")
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(certificate)
    monitor = copy.deepcopy(next(o for o in render("base") if o["kind"] == "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["port"] = 9400  # a port name, not a number
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(monitor)


def test_vendored_crds_say_where_they_came_from() -> None:
    readme = (CRDS / "README.md").read_text(encoding="utf-8")
    rows = {
        m.group(1): (m.group(2), m.group(3))
        for m in re.finditer(r"^\| `([^`]+)` \| [^|]+ \| (v[\d.]+) \| ([0-9a-f]{40}) \|", readme, re.M)
    }
    assert set(rows) == set(CUSTOM_KINDS.values())
    monitor = yaml.safe_load((CRDS / "monitoring.coreos.com_servicemonitors.yaml").read_text(encoding="utf-8"))
    version = monitor["metadata"]["annotations"]["operator.prometheus.io/version"]
    assert rows["monitoring.coreos.com_servicemonitors.yaml"][0] == f"v{version}"


def test_every_weightserve_variable_the_shipped_files_name_is_one_the_server_accepts() -> None:
    """A variable the image, the manifests or the docs tell an operator to set must not stop
    the server as an unknown setting (WEIGHTSERVE_TLS_SERVER_NAME did, from the Dockerfile's advice)."""
    from weightserve.config import check_variables

    root = Path(__file__).resolve().parents[2]
    files = [root / "Dockerfile", root / "README.md", *root.glob("docs/*.md"), *root.glob("deploy/**/*.yaml")]
    named: dict[str, str] = {}
    for path in files:
        for name in re.findall(r"\bWEIGHTSERVE_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(encoding="utf-8")):
            named.setdefault(name, str(path.relative_to(root)))
    refused = {}
    named.pop("WEIGHTSERVE_HEADLESS_SERVICE_HOST", None)  # deployment.md names it as one the server refuses
    for name, where in named.items():
        try:
            check_variables({name: "x"})
        except ValueError as e:
            refused[name] = f"{where}: {e}"
    assert not refused, f"named but refused by `weightserve serve`: {refused}"
