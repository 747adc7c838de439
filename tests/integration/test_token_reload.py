"""`weightserve serve --auth-tokens` re-reads its token file on SIGHUP, in a real process."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from tests.integration.faultkit import ServerProcess
from tests.server.test_security import MODEL, WORKERS, write_tokens
from weightserve.client import WeightClient
from weightserve.errors import FetchError
from weightserve.server.tokens import token_digest


def wait_for_line(server: ServerProcess, text: str, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while server.log().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged {count} times:\n{server.log()}"
        time.sleep(0.05)


@pytest.mark.fault("missing, unknown or out-of-scope token")
def test_sighup_reloads_the_tokens_and_a_broken_file_keeps_them(
    model_root: Path, server_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    path = write_tokens(tmp_path / "tokens.toml")
    server = server_process(model_root, "--auth-tokens", str(path)).start()
    assert server.proc is not None
    with WeightClient(server.address, token=WORKERS) as client:
        assert [m.name for m in client.list_models()] == [MODEL]

    os.kill(server.proc.pid, signal.SIGHUP)  # the file is unchanged: only the signal reads it again
    wait_for_line(server, "auth tokens reloaded", 1)

    path.write_text(path.read_text().replace(token_digest(WORKERS), token_digest("next-workers")))
    os.kill(server.proc.pid, signal.SIGHUP)
    wait_for_line(server, "auth tokens reloaded", 2)
    with WeightClient(server.address, token="next-workers") as client:
        assert [m.name for m in client.list_models()] == [MODEL]

    path.write_text("[[tokens]\nbroken")
    os.kill(server.proc.pid, signal.SIGHUP)
    wait_for_line(server, "auth tokens not reloaded, keeping the 3 in force", 1)
    with WeightClient(server.address, token="next-workers") as client:
        assert [m.name for m in client.list_models()] == [MODEL]
    with WeightClient(server.address, token=WORKERS, timeout=2) as client, pytest.raises(FetchError) as info:
        client.list_models()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "next-workers" not in server.log() and WORKERS not in server.log()
