"""`weightserve ls` and `weightserve fetch` against a served root, through cli.main()."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from weightserve.cli import main

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
