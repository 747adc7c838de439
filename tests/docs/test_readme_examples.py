"""The README's examples run as written, against a live server, with generated models.

Every fenced sh, python and toml block of README.md runs, in order, unless a
`<!-- readme-test: skip REASON -->` line stands before it (Docker, CUDA-only, network).
The stand-ins, and nothing else, are substituted:

- the models the README names (`org/llama-7b`, `org/llama-70b`, `org/mixtral`) are tiny
  generated checkpoints under a temporary model root, which stands in for `/models`;
- `weights:50051` and `localhost:50051` are the live server; `0.0.0.0:50051` a free
  loopback port; `/tmp/...` and `/ssd/...` paths live under the test's directory;
- `device="cuda..."` runs on the CPU when this machine has no GPU.

A `weightserve serve` command is started, must answer a health check, and is stopped
with SIGTERM (exit 0); every other command must exit 0. Python blocks get the
namespace's `client` (a WeightClient on the live server) and `model` (a module shaped
like org/llama-7b), each block in a fresh copy of it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.docs.readme_blocks import Block, blocks, shell_commands
from tests.sharding import fixtures as fx
from weightserve.client import WeightClient
from weightserve.sharding.rules import load_rules
from weightserve.testing import BackgroundServer, LlamaShape, write_llama_checkpoint

BIN = Path(sys.executable).parent
LLAMA = LlamaShape(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                   num_key_value_heads=2, vocab_size=256)  # fmt: skip
"""Splits 8 ways (heads, padded vocabulary) and into 2 pipeline stages, as the examples ask."""

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding models/ (the stand-in for /models) and room for what the examples write."""
    root = tmp_path_factory.mktemp("readme")
    models = root / "models"
    for name in ("org/llama-7b", "org/llama-70b"):
        write_llama_checkpoint(models / name, LLAMA, num_files=2)
    fx.mixtral(hidden=64, heads=8, kv_heads=2, intermediate=64, experts=8, layers=32, vocab=256).write(
        models / "org" / "mixtral"
    )
    return root


@pytest.fixture(scope="module")
def server(workspace: Path) -> Iterator[BackgroundServer]:
    from weightserve.config import ServerConfig

    config = ServerConfig(model_roots=(workspace / "models",), listen="127.0.0.1:0", state_dir=workspace / "state")
    with BackgroundServer(config) as running:
        yield running


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def substitute(text: str, workspace: Path, address: str) -> str:
    """Put the stand-ins in place of what the README names (see the module docstring), in one pass."""
    replacements = {
        ".venv/bin/": f"{BIN}/",
        "0.0.0.0:50051": f"127.0.0.1:{free_port()}",
        "weights:50051": address,
        "localhost:50051": address,
        "/models": str(workspace / "models"),
        "/tmp/": f"{workspace / 'tmp'}/",
        "/ssd/": f"{workspace / 'ssd'}/",
    }
    pattern = "|".join(
        rf"(?<![\w.]){re.escape(key)}" if key.startswith("/") else re.escape(key) for key in replacements
    )
    text = re.sub(pattern, lambda m: replacements[m.group(0)], text)
    if not torch.cuda.is_available():
        text = re.sub(r"""device=(["'])cuda(:\d+)?\1""", 'device="cpu"', text)
    return text


def module_like(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An nn.Module whose state_dict has exactly these names and shapes (what load_into needs)."""
    root = torch.nn.Module()
    for name, tensor in state.items():
        *path, leaf = name.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, torch.nn.Parameter(torch.zeros_like(tensor), requires_grad=False))
    return root


def run_serve(command: str, cwd: Path) -> None:
    """Start a `weightserve serve` command, wait until it is SERVING, then stop it with SIGTERM."""
    argv = shlex.split(command)
    port = int(re.search(r"127\.0\.0\.1:(\d+)", command).group(1))  # type: ignore[union-attr]
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                assert proc.poll() is None, f"{command!r} exited: {proc.communicate()[0]}"
                with contextlib.suppress(grpc.RpcError):
                    answer = health.Check(health_pb2.HealthCheckRequest(), timeout=1, wait_for_ready=True)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                assert time.monotonic() < deadline, f"{command!r} never answered its health check"
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0, f"{command!r} exited {proc.returncode} on SIGTERM:\n{output}"
    finally:
        proc.kill()
        proc.wait()


def run_shell(block: Block, text: str, workspace: Path) -> None:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for command in shell_commands(text):
        if re.match(rf"^(?:{re.escape(str(BIN))}/)?weightserve serve\b", command):
            run_serve(command, workspace)
            continue
        done = subprocess.run(
            ["bash", "-c", command], check=False, cwd=workspace, env=env, capture_output=True, text=True, timeout=240
        )
        assert done.returncode == 0, f"{block.label}: {command!r} exited {done.returncode}:\n{done.stdout}{done.stderr}"


README_BLOCKS = blocks()


def test_every_block_is_run_or_skipped_with_a_reason() -> None:
    assert README_BLOCKS, "no code blocks found in README.md"
    for block in README_BLOCKS:
        assert block.language in ("sh", "python", "toml"), f"{block.label}: no runner for {block.language!r}"


@pytest.fixture(scope="module")
def namespace(server: BackgroundServer) -> Iterator[dict[str, Any]]:
    with WeightClient(server.address) as client:
        manifest = client.get_manifest("org/llama-7b")
        shapes = {t.name: torch.empty(tuple(t.shape)) for t in manifest.tensors}
        yield {"client": client, "model": module_like(shapes)}


@pytest.mark.parametrize("block", README_BLOCKS, ids=[b.label for b in README_BLOCKS])
def test_readme_block_runs(block: Block, workspace: Path, server: BackgroundServer, namespace: dict[str, Any]) -> None:
    if block.skip:
        pytest.skip(block.skip)
    text = substitute(block.text, workspace, server.address)
    if block.language == "sh":
        run_shell(block, text, workspace)
    elif block.language == "python":
        # each block sees the live `client` (a block may open and close its own under that name)
        exec(compile(text, block.label, "exec"), dict(namespace))
    else:
        rules = workspace / f"rules-{block.line}.toml"
        rules.write_text(text)
        assert load_rules(rules).operator, f"{block.label}: a TOML block of the README holds no rules"
