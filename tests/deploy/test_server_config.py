"""Each overlay's weightserve.toml runs a real server: the probes' paths answer on the
metrics port, `weightserve health` (the image's HEALTHCHECK) says SERVING, and SIGTERM
ends the process, cleanly, within the pod's terminationGracePeriodSeconds.

The container's own arguments run (the tls component's flags included, with a test
certificate). Only the paths and ports a test machine cannot have are rewritten (model
roots, cache, token and certificate files, the fixed ports); every other setting is the
file's.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import TINY_LLAMA
from tests.deploy.manifests import OVERLAYS, config_text, container, pod_spec, server, tomllib
from weightserve.config import FILE_SETTINGS
from weightserve.config_file import dump_settings
from weightserve.testing import make_ca, make_leaf, write_llama_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            code: int = response.status
            return code
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def local_copy(path: str, tmp: Path) -> tuple[Path, dict[str, object]]:
    """The overlay's settings with machine paths under tmp and ports free on loopback."""
    values = tomllib.loads(config_text(path, server(path)))
    models = tmp / "models"
    write_llama_checkpoint(models / "org" / "tiny-llama", TINY_LLAMA, num_files=1)
    token = "deploy-test-token"
    tokens = tmp / "tokens.toml"
    digest = hashlib.sha256(token.encode()).hexdigest()
    tokens.write_text(f'[[tokens]]\nname = "workers"\nsha256 = "{digest}"\nmodels = ["**"]\n')
    listen = str(values["listen"])
    values.update(
        model_roots=[str(models)],
        disk_cache_dir=str(tmp / "cache"),
        auth_tokens=str(tokens),
        metrics_listen=f"127.0.0.1:{free_port()}",
        listen=f"unix:{tmp / 'ws.sock'}" if listen.startswith("unix:") else f"127.0.0.1:{free_port()}",
    )
    if "control_listen" in values:  # a fleet has none (overlays/fleet)
        values["control_listen"] = f"127.0.0.1:{free_port()}"
    file = tmp / "weightserve.toml"
    file.write_text(dump_settings(values, plain=FILE_SETTINGS))
    return file, values


def local_args(path: str, config: Path, tmp: Path) -> tuple[list[str], Path | None]:
    """The container's own arguments, with its --config and TLS files (made here, for
    127.0.0.1, signed by a test CA) moved under tmp; and that CA when TLS is on."""
    args = list(container(server(path))["args"])
    args[args.index("--config") + 1] = str(config)
    tls_ca = None
    for flag in ("--tls-cert", "--tls-key"):
        if flag in args:
            tls_ca = tmp / "tls" / "ca.crt"
            if not tls_ca.exists():
                ca = make_ca()
                tls_ca.parent.mkdir()
                tls_ca.write_bytes(ca.cert)
                leaf = make_leaf(ca, "weightserve")
                cert_at = Path(args[args.index("--tls-cert") + 1])
                key_at = Path(args[args.index("--tls-key") + 1])
                (tmp / "tls" / cert_at.name).write_bytes(leaf.cert)
                (tmp / "tls" / key_at.name).write_bytes(leaf.key)
            index = args.index(flag) + 1
            args[index] = str(tmp / "tls" / Path(args[index]).name)
    return args, tls_ca


@pytest.mark.parametrize("path", OVERLAYS)
def test_overlay_configuration_serves_and_drains(path: str, tmp_path: Path) -> None:
    file, values = local_copy(path, tmp_path)
    argv, tls_ca = local_args(path, file, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSERVE_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "weightserve.cli", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://{values['metrics_listen']}"
    try:
        deadline = time.monotonic() + 60
        while status(base + "/readyz") != 200:
            assert process.poll() is None, f"the server exited:\n{process.stdout.read() if process.stdout else ''}"
            assert time.monotonic() < deadline, "not ready within 60 s"
            time.sleep(0.2)
        assert status(base + "/livez") == 200
        health = subprocess.run(
            [sys.executable, "-m", "weightserve.cli", "health", "--server", str(values["listen"]), "--timeout", "5"]
            + (["--tls-ca", str(tls_ca)] if tls_ca else []),
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert health.returncode == 0 and "SERVING" in health.stdout, health.stdout + health.stderr
        process.send_signal(signal.SIGTERM)
        grace = pod_spec(server(path))["terminationGracePeriodSeconds"]
        assert process.wait(timeout=grace) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
