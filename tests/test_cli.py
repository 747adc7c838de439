"""The `weightserve` command through cli.main(): the client commands, health, and serve's settings."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2
from safetensors.torch import load_file

from tests.integration.faultkit import free_port, server_env, wait_serving
from tests.server.test_experts import MODEL as MOE_MODEL
from tests.server.test_experts import root
from weightserve import __version__
from weightserve.cli import main
from weightserve.cli.control import POLICIES
from weightserve.client import AsyncWeightClient, WeightClient
from weightserve.config import setting_names
from weightserve.config_file import dump_settings
from weightserve.eplb import DEFAULT_POLICY, Policy
from weightserve.eplb.policies.base import POLICIES as POLICIES_REGISTRY
from weightserve.v1 import weightserve_pb2 as pb

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["root"]  # the module-scoped Mixtral-shaped checkpoint fixture of tests/server/test_experts.py

MODEL = "org/tiny-llama"


def reference(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def test_ls_lists_the_model(model_root: Path, serve, capsys: pytest.CaptureFixture[str]) -> None:
    server = serve(model_root)

    assert main(["ls", "--server", server.address]) == 0

    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[:4] == ["MODEL", "FORMAT", "BYTES", "REVISION"]
    (row,) = rows
    name, fmt, nbytes, revision = row.split()[:4]
    total = sum(p.stat().st_size for p in (model_root / MODEL).glob("*.safetensors"))
    assert (name, fmt, nbytes) == (MODEL, "safetensors", f"{total:,}")
    assert revision.startswith("local-")
    assert header.index("FORMAT") == row.index("safetensors")  # columns line up
    assert header.index("REVISION") == row.index(revision)


def test_fetch_writes_the_model_and_its_files(
    model_root: Path, serve, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = serve(model_root)
    out = tmp_path / "out"

    assert main(["fetch", MODEL, "--server", server.address, "--out", str(out)]) == 0

    fetched = load_file(str(out / "model.safetensors"))
    original = reference(model_root / MODEL)
    assert set(fetched) == set(original)
    for name, tensor in original.items():
        assert fetched[name].dtype == tensor.dtype and fetched[name].shape == tensor.shape
        assert torch.equal(fetched[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (model_root / MODEL / name).read_bytes()
    assert not [p for p in out.iterdir() if p.name.endswith(".part")]
    message = capsys.readouterr().out
    assert f"wrote {len(original)} tensors" in message and "3 files" in message


def test_fetch_of_an_unknown_model_fails_with_a_message(
    model_root: Path, serve, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = serve(model_root)
    assert main(["fetch", "org/nope", "--server", server.address, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("weightserve fetch: ")
    assert "NOT_FOUND" in err and "org/nope" in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_missing_required_arguments_exit_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fetch", MODEL])
    assert info.value.code == 2
    assert "--server" in capsys.readouterr().err


@pytest.mark.fault("bad or unknown server setting", cases=3)
def test_fetch_checks_out_before_fetching(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file, or a path under one, is refused at once: no server is asked (none listens at port 1)."""
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    for out, said in (
        (afile, "is a file, not a directory"),
        (afile / "x", "cannot make the directory"),
        (Path("/proc/none/x"), "cannot make the directory"),
    ):
        assert main(["fetch", MODEL, "--server", "127.0.0.1:1", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"weightserve fetch: --out {out}: {said}") and err.count("\n") == 1, err
    assert afile.read_text() == "not a directory"


def test_fetch_says_in_one_line_why_writing_failed(
    model_root: Path, serve, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(path: Path, write: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr("weightserve.atomic.atomic_write", full)
    server = serve(model_root)
    assert main(["fetch", MODEL, "--server", server.address, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("weightserve fetch: no space left on the device of ") and err.count("\n") == 1, err


@pytest.mark.fault("bad or unknown server setting", cases=9)
@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["fetch", MODEL, "--out", "o", "--world-size", "0"], "argument --world-size: '0' must be >= 1"),
        (["fetch", MODEL, "--out", "o", "--world-size", "two"], "argument --world-size: 'two' is not a whole number"),
        (["fetch", MODEL, "--out", "o", "--rank", "-1"], "argument --rank: '-1' must be >= 0"),
        (["prefetch", MODEL, "--world-size", "0"], "argument --world-size: '0' must be >= 1"),
        (["prefetch", MODEL, "--ranks", "0", "-3"], "argument --ranks: '-3' must be >= 0"),
        (["shard", MODEL, "--out", "o", "--world-size", "0"], "argument --world-size: '0' must be >= 1"),
        (["rebalance", MODEL, "--nodes", "0"], "argument --nodes: '0' must be >= 1"),
        (["rebalance", MODEL, "--gpus-per-node", "-4"], "argument --gpus-per-node: '-4' must be >= 1"),
        (["rebalance", MODEL, "--num-replicas", "0"], "argument --num-replicas: '0' must be >= 1"),
    ],
)
def test_a_size_below_1_or_a_negative_rank_is_refused_at_the_flag(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--server", "127.0.0.1:1"] if argv[0] != "shard" else argv)
    assert info.value.code == 2
    assert said in capsys.readouterr().err


# ------------------------------------------------------------------ lazy imports


def test_the_parser_and_help_import_neither_torch_nor_grpc() -> None:
    code = (
        "import json, sys\n"
        "from weightserve.cli import build_parser, main\n"
        "build_parser()\n"
        "helps = ['rebalance', 'report-load', 'serve', 'health', 'prefetch', 'fetch', 'ls']\n"
        "for argv in (['--help'], ['--version'], *([name, '--help'] for name in helps)):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = ('torch', 'grpc', 'numpy', 'weightserve.client', 'weightserve.server', 'weightserve.v1')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(heavy))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    *help_text, loaded = done.stdout.splitlines()
    assert json.loads(loaded) == []
    assert any("rebalance" in line for line in help_text)


def test_health_imports_no_torch(refusing_port: int) -> None:
    # a container probe runs it every few seconds: grpc and the client's channel security
    # (TLS, tokens) yes; torch and the clients themselves no
    code = (
        "import json, sys\n"
        "from weightserve.cli import main\n"
        f"assert main(['health', '--server', '127.0.0.1:{refusing_port}']) == 1\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('torch', 'weightserve.client')))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    light = ["weightserve.client", "weightserve.client.call_metadata", "weightserve.client.routing",
             "weightserve.client.security"]  # fmt: skip
    assert json.loads(done.stdout.splitlines()[-1]) == light


def test_policy_help_names_the_registered_policies(capsys: pytest.CaptureFixture[str]) -> None:
    from weightserve.eplb import available_policies

    assert sorted(POLICIES) == available_policies()
    with pytest.raises(SystemExit):
        main(["rebalance", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert all(name in shown for name in POLICIES)
    assert f"{DEFAULT_POLICY} (the default)" in shown


# ----------------------------------------------------------- expert load, rebalance

HOT = [[1000, 900, 5, 5, 5, 5, 5, 5], [5, 5, 5, 5, 5, 5, 800, 700]]


def test_report_load_reads_json_npy_pt_and_stdin(
    root: Path, serve, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    address = serve(root).address
    (tmp_path / "load.json").write_text(json.dumps(HOT))
    np.save(tmp_path / "load.npy", np.array(HOT, dtype=np.int32))
    torch.save(torch.tensor(HOT), tmp_path / "load.pt")
    for n, source in enumerate(("load.json", "load.npy", "load.pt"), start=1):
        assert main(["report-load", MOE_MODEL, "--server", address, "--counts", str(tmp_path / source)]) == 0
        assert capsys.readouterr().out == f"{MOE_MODEL}: {n} report(s) in the load window\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(HOT)))
    assert main(["report-load", MOE_MODEL, "--server", address, "--counts", "-"]) == 0
    assert capsys.readouterr().out == f"{MOE_MODEL}: 4 report(s) in the load window\n"


def test_report_load_of_a_bad_table_fails_with_a_message(
    root: Path, serve, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = serve(root).address
    (tmp_path / "flat.json").write_text(json.dumps(HOT[0]))
    (tmp_path / "broken.json").write_text("[[1, 2")
    # a table the client refuses is an invalid request: exit 2, as a bad flag value is
    assert main(["report-load", MOE_MODEL, "--server", address, "--counts", str(tmp_path / "flat.json")]) == 2
    assert "weightserve report-load: expert load must be 2-D" in capsys.readouterr().err
    assert main(["report-load", MOE_MODEL, "--server", address, "--counts", str(tmp_path / "broken.json")]) == 2
    assert f"cannot read counts from {tmp_path / 'broken.json'}" in capsys.readouterr().err
    assert main(["report-load", MOE_MODEL, "--server", address, "--counts", str(tmp_path / "none.json")]) == 2


def test_rebalance_prints_balancedness_and_the_bytes_per_rank(
    root: Path, serve, capsys: pytest.CaptureFixture[str]
) -> None:
    address = serve(root).address
    with WeightClient(address) as client:
        client.report_expert_load(MOE_MODEL, HOT)
    argv = ["rebalance", MOE_MODEL, "--server", address, "--nodes", "1", "--gpus-per-node", "4", "--num-replicas", "12"]

    assert main([*argv, "--policy", "locality-aware"]) == 0

    done, balance, header, *ranks = capsys.readouterr().out.splitlines()
    assert done.startswith(f"rebalanced {MOE_MODEL} to mapping v")
    before, after = (float(x) for x in balance.removeprefix("balancedness ").split(" -> "))
    assert after > before
    assert header.split() == ["EP", "RANK", "EXPERTS", "BYTES", "TO", "FETCH"]
    assert [int(row.split()[0]) for row in ranks] == [0, 1, 2, 3]


class FailingPolicy(Policy):
    """A policy that fails once its gate opens, so the job ends FAILED with this message."""

    gate = threading.Event()

    def place(self, problem, previous):  # type: ignore[no-untyped-def]
        assert self.gate.wait(timeout=60), "the test never opened the gate"
        raise RuntimeError("no placement for this test")


@pytest.mark.parametrize("fail", ["at once", "while the CLI waits"])
def test_rebalance_of_a_failing_job_exits_1_with_its_error(
    root: Path, serve, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, fail: str
) -> None:
    address = serve(root).address
    with WeightClient(address) as client:
        client.report_expert_load(MOE_MODEL, HOT)
    FailingPolicy.gate.clear()
    if fail == "at once":
        FailingPolicy.gate.set()
    else:  # the job fails only after the CLI saw it running: no mapping will wake the wait
        seen = AsyncWeightClient.get_rebalance

        async def get_rebalance(self: AsyncWeightClient, job_id: str, **kwargs: float) -> pb.GetRebalanceResponse:
            job = await seen(self, job_id, **kwargs)
            if job.state == pb.JOB_STATE_RUNNING:
                FailingPolicy.gate.set()
            return job

        monkeypatch.setattr(AsyncWeightClient, "get_rebalance", get_rebalance)
    with POLICIES_REGISTRY.registered("failing-test", FailingPolicy):
        code = main(
            ["rebalance", MOE_MODEL, "--server", address, "--policy", "failing-test", "--nodes", "1",
             "--gpus-per-node", "4", "--timeout", "60"]
        )  # fmt: skip
    assert code == 1
    out = capsys.readouterr().out
    assert out.startswith("rebalance ") and f"of {MOE_MODEL}: failed" in out
    assert "no placement for this test" in out
    assert "failing-test" not in POLICIES_REGISTRY


def test_rebalance_without_load_is_a_failed_precondition(root: Path, serve, capsys: pytest.CaptureFixture[str]) -> None:
    address = serve(root).address
    assert main(["rebalance", MOE_MODEL, "--server", address, "--nodes", "1", "--gpus-per-node", "4"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("weightserve rebalance: ") and "FAILED_PRECONDITION" in err


def test_an_unknown_variable_stops_serve_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("WEIGHTSERVE_CHUNK_BYTE", "65536")
    assert main(["serve", "--model-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "unknown setting WEIGHTSERVE_CHUNK_BYTE; did you mean WEIGHTSERVE_CHUNK_BYTES?" in err


@pytest.mark.parametrize(
    ("code", "said"), [(errno.ENOSPC, "no space left on the device of"), (errno.EROFS, "cannot write")]
)
def test_shard_out_of_space_is_one_line_naming_the_directory(
    model_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    code: int,
    said: str,
) -> None:
    from weightserve.sharding.sharded_state import write

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(write, "write_part", full_disk)
    out = tmp_path / "out"
    assert main(["shard", str(model_root / "org" / "tiny-llama"), "--world-size", "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"weightserve shard: {said} {out}")


# ------------------------------------------------------------ version, health, --server

FAST = pytest.mark.timeout(30)
"""Far below the --timeout these commands are given: a command that waits for a server instead of
saying at once that none listens fails on this timeout, not on a timing assertion."""


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound, never listening."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"weightserve {__version__}\n"


@FAST
def test_health_exits_0_only_when_serving(model_root: Path, serve, capsys: pytest.CaptureFixture[str]) -> None:
    server = serve(model_root)
    address = server.address
    assert main(["health", "--server", address]) == 0
    assert main(["health", "--server", address, "--service", "weightserve.v1.WeightService"]) == 0
    assert capsys.readouterr().out == f"{address}: SERVING\n{address} weightserve.v1.WeightService: SERVING\n"

    assert main(["health", "--server", address, "--service", "no.such.Service"]) == 1
    assert capsys.readouterr().err == f"weightserve health: {address} has no service 'no.such.Service' (NOT_FOUND)\n"

    not_serving = server.server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    asyncio.run_coroutine_threadsafe(not_serving, server._loop).result(timeout=10)
    assert main(["health", "--server", address]) == 1
    assert capsys.readouterr().out == f"{address}: NOT_SERVING\n"


@FAST
@pytest.mark.parametrize("command", ["health", "ls", "fetch", "prefetch", "report-load", "rebalance"])
def test_nothing_listening_is_said_at_once(
    refusing_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    address = f"127.0.0.1:{refusing_port}"
    extra = {
        "fetch": ["m", "--out", str(tmp_path)],
        "prefetch": ["m"],
        "report-load": ["m", "--counts", str(tmp_path / "load.json")],
        "rebalance": ["m"],
    }
    (tmp_path / "load.json").write_text(json.dumps(HOT))
    assert main([command, *extra.get(command, []), "--server", address, "--timeout", "600"]) == 1
    assert capsys.readouterr().err == f"weightserve {command}: no weightserve at {address}: connection refused\n"


@FAST
def test_the_server_comes_from_weightserve_server(
    model_root: Path, serve, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WEIGHTSERVE_SERVER", serve(model_root).address)
    assert main(["ls"]) == 0
    assert MODEL in capsys.readouterr().out
    monkeypatch.delenv("WEIGHTSERVE_SERVER")
    with pytest.raises(SystemExit) as info:
        main(["ls"])
    assert info.value.code == 2 and "--server" in capsys.readouterr().err


# ------------------------------------------------------------------ prefetch, fetch summary


@FAST
@pytest.mark.parametrize("wait", [False, True])
def test_prefetch_prints_one_summary_line(
    model_root: Path, serve, capsys: pytest.CaptureFixture[str], wait: bool
) -> None:
    address = serve(model_root, cache_memory=64 * 2**20).address
    with WeightClient(address) as client:
        manifests = [client.get_manifest(MODEL, rank, 2) for rank in (0, 1)]
    argv = ["prefetch", MODEL, "--server", address, "--world-size", "2", "--ranks", "0", "1"]
    assert main([*argv, "--wait"] if wait else argv) == 0
    (line,) = capsys.readouterr().out.splitlines()
    nbytes = sum(m.total_bytes for m in manifests)
    revision = manifests[0].revision
    what = f"{MODEL} (ranks 0 1 of world size 2, revision {revision}): {nbytes:,} bytes"
    assert line.startswith(f"prefetched {what} in ") if wait else line == f"prefetching {what}, in the background"


@FAST
def test_prefetch_of_a_rank_past_the_world_size_exits_2(
    model_root: Path, serve, capsys: pytest.CaptureFixture[str]
) -> None:
    address = serve(model_root).address
    assert main(["prefetch", MODEL, "--server", address, "--world-size", "2", "--ranks", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("weightserve prefetch: ") and "INVALID_ARGUMENT" in err and err.count("\n") == 1


@FAST
def test_rebalance_with_an_unknown_policy_is_one_line_exit_2(
    root: Path, serve, capsys: pytest.CaptureFixture[str]
) -> None:
    address = serve(root).address
    with WeightClient(address) as client:
        client.report_expert_load(MOE_MODEL, HOT)
    argv = ["rebalance", MOE_MODEL, "--server", address, "--policy", "no-such", "--nodes", "1", "--gpus-per-node", "4"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("weightserve rebalance: ") and "INVALID_ARGUMENT" in err and "'no-such'" in err
    assert err.count("\n") == 1


# ------------------------------------------------------------------ serve: one line per bad setting


def serve_fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run `serve` expecting exit 2 with one line on stderr and nothing else; return that line."""
    assert main(["serve", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    assert captured.err.startswith("weightserve serve: ")
    return captured.err.removeprefix("weightserve serve: ").rstrip("\n")


@pytest.mark.fault("bad or unknown server setting")
@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--read-threads", "two"], "--read-threads 'two': 'two' is not a whole number"),
        (["--read-threads", "0"], "read_threads 0 must be >= 1"),
        (["--chunk-bytes", "lots"], "--chunk-bytes 'lots': 'lots' is not a size (try 20GiB, 512MB or a byte count)"),
        (["--chunk-bytes", "8MiB"], "chunk_bytes 8388608 must be within [4096, 4 MiB - 16 KiB]"),
        (
            ["--cache-memory", "3 parsecs"],
            "--cache-memory '3 parsecs': '3 parsecs' is not a size (try 20GiB, 512MB or a byte count)",
        ),
        (["--grace-seconds", "soon"], "--grace-seconds 'soon': 'soon' is not a number"),
        (["--listen", "localhost"], "--listen 'localhost': must be HOST:PORT or unix:PATH"),
        (["--log-level", "loud"], "log_level 'loud' must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL (any case)"),
        (["--log-format", "xml"], "log_format 'xml' must be one of text, json"),
        (["--loader", "mmap"], "loader 'mmap' must be one of safetensors, fastsafetensors"),
        (["--max-streams", "0"], "max_streams 0 and max_streams_per_peer 64 must be >= 1"),
        (["--dummy", "nameless"], "--dummy 'nameless': 'nameless' is not NAME=CONFIG.json"),
        (["--socket-mode", "rw-rw----"], "socket_mode 'rw-rw----' must be octal permissions such as 0660"),
    ],
)
def test_a_bad_serve_flag_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], said: str
) -> None:
    assert serve_fails(["--model-root", str(tmp_path), *flags], capsys) == said


@pytest.mark.fault("bad or unknown server setting", cases=9)
def test_an_address_with_a_port_outside_0_to_65535_is_refused_naming_its_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """grpc took such a port modulo 2^16 (116156 listened on 50620); the metrics port raised OverflowError."""
    for flag, value, said in (
        ("--listen", "127.0.0.1:116156", "port 116156 is outside 0-65535"),
        ("--listen", "127.0.0.1:-5", "must be HOST:PORT with a port number within 0-65535"),
        ("--listen", "[::1]:65536", "port 65536 is outside 0-65535"),
        ("--metrics-listen", "127.0.0.1:75536", "port 75536 is outside 0-65535"),
        ("--metrics-listen", "127.0.0.1:99999999999999999999", "is outside 0-65535"),
        ("--control-listen", "127.0.0.1:70000", "port 70000 is outside 0-65535"),
        ("--advertise", "peer.local:65536", "port 65536 is outside 0-65535"),
        ("--advertise", ":50051", "must name a host other replicas reach"),
        ("--coordination", "redis://redis:70000", "port '70000' must be a number within 0-65535"),
    ):
        line = serve_fails(["--model-root", str(tmp_path), flag, value], capsys)
        assert line.startswith(f"{flag} {value!r}: ") and said in line, line


@pytest.mark.fault("bad or unknown server setting", cases=2)
def test_a_port_outside_the_range_is_refused_from_a_variable_or_the_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WEIGHTSERVE_LISTEN", "127.0.0.1:116157")
    said = "WEIGHTSERVE_LISTEN='127.0.0.1:116157': port 116157 is outside 0-65535"
    assert serve_fails(["--model-root", str(tmp_path)], capsys) == said
    monkeypatch.delenv("WEIGHTSERVE_LISTEN")
    config = tmp_path / "ws.toml"
    config.write_text('metrics_listen = "127.0.0.1:75536"\n')
    said = f"config file {config}: metrics_listen = '127.0.0.1:75536': port 75536 is outside 0-65535"
    assert serve_fails(["--model-root", str(tmp_path), "--config", str(config)], capsys) == said


def test_argparse_keeps_usage_for_what_is_not_a_value(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--no-such-flag"])
    assert info.value.code == 2 and "usage:" in capsys.readouterr().err


@pytest.mark.fault("bad or unknown server setting")
@pytest.mark.parametrize("which", ["--listen", "--metrics-listen"])
def test_a_port_in_use_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], which: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = "--metrics-listen" if which == "--listen" else "--listen"
        line = serve_fails(["--model-root", str(tmp_path), which, f"127.0.0.1:{port}", other, "127.0.0.1:0"], capsys)
    reason = "Address already in use; is another server running there?"
    assert line == f"{which} 127.0.0.1:{port}: cannot listen there ({reason})"


# ------------------------------------------------------------------ serve --config, --print-config


def printed_config(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    assert main(["serve", *argv, "--print-config"]) == 0
    return tomllib.loads(capsys.readouterr().out)


def test_print_config_shows_every_setting_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    printed = printed_config(["--model-root", "/m", "--chunk-bytes", "1MiB", "--log-level", "debug"], capsys)
    assert list(printed) == setting_names()
    assert printed["model_roots"] == ["/m"] and printed["chunk_bytes"] == 2**20 and printed["log_level"] == "DEBUG"
    assert printed["sharding_rules"] == "" and printed["in_place_messages"] is True


def test_config_file_under_variables_under_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ws.toml"
    path.write_text(
        'model_roots = ["/models"]\nlisten = "0.0.0.0:50051"\ncache_memory = "20GiB"\n'
        'read_threads = 3\nprefetch_depth = 4\nallow_source = ["hf://org/*"]\n'
    )
    monkeypatch.setenv("WEIGHTSERVE_READ_THREADS", "5")
    monkeypatch.setenv("WEIGHTSERVE_PREFETCH_DEPTH", "6")
    printed = printed_config(["--config", str(path), "--prefetch-depth", "7"], capsys)
    assert printed["model_roots"] == ["/models"] and printed["listen"] == "0.0.0.0:50051"
    assert printed["cache_memory"] == 20 * 2**30 and printed["allow_source"] == ["hf://org/*"]
    assert (printed["read_threads"], printed["prefetch_depth"]) == (5, 7)

    monkeypatch.setenv("WEIGHTSERVE_CONFIG", str(path))  # the variable names the file too
    assert printed_config([], capsys)["listen"] == "0.0.0.0:50051"


def test_printed_config_is_a_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model-root", "/a", "--model-root", "/b", "--dummy", f"org/fake={tmp_path / 'config.json'}"]
    first = printed_config([*argv, "--cache-memory", "1GiB", "--disk-cache-dir", "/cache"], capsys)
    path = tmp_path / "ws.toml"
    path.write_text(dump_settings(first))
    assert printed_config(["--config", str(path)], capsys) == first


@pytest.mark.fault("bad or unknown server setting")
def test_a_config_file_with_an_unknown_key_names_the_closest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ws.toml"
    path.write_text('model_root = ["/models"]\n')
    assert serve_fails(["--config", str(path)], capsys) == (
        f"config file {path}: unknown setting 'model_root'; did you mean model_roots?"
    )
    path.write_text('read_threads = "many"\n')
    assert serve_fails(["--config", str(path)], capsys) == (
        f"config file {path}: read_threads = 'many': 'many' is not a whole number"
    )
    assert serve_fails(["--config", str(tmp_path / "none.toml")], capsys).endswith("(No such file or directory)")


def test_serve_needs_a_root_a_source_or_a_dummy_and_starts_with_remote_sources_only(
    capsys: pytest.CaptureFixture[str],
) -> None:
    said = serve_fails(["--listen", "127.0.0.1:0"], capsys)
    assert said == "give at least one --model-root, --allow-source or --dummy (or WEIGHTSERVE_MODEL_ROOTS)"
    address = f"127.0.0.1:{free_port()}"
    exe = Path(sys.executable).with_name("weightserve")
    argv = [str(exe), "serve", "--allow-source", "s3", "--listen", address, "--metrics-listen", "off"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=server_env())
    try:
        wait_serving(address, 30, alive=lambda: None if proc.poll() is None else f"exit {proc.returncode}")
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


@pytest.mark.fault("bad or unknown server setting")
def test_a_setting_whose_extra_is_not_installed_stops_serve_with_one_line(
    model_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # as in an image without the fleet extra
    args = ["serve", "--model-root", str(model_root), "--listen", f"127.0.0.1:{free_port()}"]
    args += ["--metrics-listen", "off", "--coordination", "redis://127.0.0.1:1", "--advertise", "127.0.0.1:50051"]
    assert main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--coordination redis:// needs the redis client: pip install 'weightserve[fleet]'" in line
