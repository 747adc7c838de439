"""The `weightserve` command against served roots, through cli.main(): ls, fetch, report-load, rebalance."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.server.test_experts import MODEL as MOE_MODEL
from tests.server.test_experts import root
from weightserve.cli import main
from weightserve.cli.control import POLICIES
from weightserve.client import AsyncWeightClient, WeightClient
from weightserve.eplb import DEFAULT_POLICY, Policy
from weightserve.eplb.policies.base import POLICIES as POLICIES_REGISTRY
from weightserve.v1 import weightserve_pb2 as pb

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


# ------------------------------------------------------------------ lazy imports


def test_the_parser_and_help_import_neither_torch_nor_grpc() -> None:
    code = (
        "import json, sys\n"
        "from weightserve.cli import build_parser, main\n"
        "build_parser()\n"
        "for argv in (['--help'], ['rebalance', '--help'], ['report-load', '--help'], ['serve', '--help']):\n"
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
    assert main(["report-load", MOE_MODEL, "--server", address, "--counts", str(tmp_path / "flat.json")]) == 1
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
