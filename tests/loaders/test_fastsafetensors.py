"""The fastsafetensors loader: the registry wiring and the missing-package error always;
its bytes against safetensors' own reader where the package is installed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightserve.client import WeightClient
from weightserve.errors import CorruptCheckpointError, PreconditionError
from weightserve.loaders import FORMAT_PREFERENCE, loader_for
from weightserve.loaders.fastsafetensors import FastSafetensorsLoader
from weightserve.loaders.pieces import read_range
from weightserve.loaders.safetensors import SafetensorsLoader
from weightserve.sharding.tensor_plan import whole_tensor

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.uint8, torch.bool,
          torch.float8_e4m3fn]  # fmt: skip


def tensors() -> dict[str, torch.Tensor]:
    out = {}
    for i, dtype in enumerate(DTYPES):
        raw = (torch.arange(24 * 8) * 7 % 251).to(torch.uint8)
        out[f"t{i}"] = raw.view(dtype).reshape(4, -1) if dtype != torch.bool else raw.reshape(4, -1) % 2 == 1
    out["empty"] = torch.empty(0, 3)
    return out


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    save_file(dict(list(tensors().items())[:5]), str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(dict(list(tensors().items())[5:]), str(tmp_path / "model-00002-of-00002.safetensors"))
    return tmp_path


def read_all(
    loader: SafetensorsLoader | FastSafetensorsLoader,
) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    out = {}
    for record in loader.records:
        buf = bytearray(record.nbytes)
        read_range(whole_tensor(record), loader.sources, 0, memoryview(buf))
        out[record.name] = (record.dtype, record.shape, bytes(buf))
    return out


def test_registered_as_a_loader_not_a_format(model_dir: Path) -> None:
    assert loader_for("fastsafetensors") is FastSafetensorsLoader
    assert "fastsafetensors" not in FORMAT_PREFERENCE
    assert FastSafetensorsLoader.find_files(model_dir) == SafetensorsLoader.find_files(model_dir)


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch, model_dir: Path) -> None:
    monkeypatch.setitem(sys.modules, "fastsafetensors", None)
    with pytest.raises(PreconditionError, match=r"pip install 'weightserve\[fastsafetensors\]'"):
        FastSafetensorsLoader(FastSafetensorsLoader.find_files(model_dir))


def test_same_bytes_as_the_default_loader(model_dir: Path) -> None:
    files = SafetensorsLoader.find_files(model_dir)
    with FastSafetensorsLoader(files) as fast, SafetensorsLoader(files) as ours:
        got = read_all(fast)
        assert got == read_all(ours)
    for name, tensor in tensors().items():
        assert got[name][2] == tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), name


def test_bad_header_fails_before_the_bulk_read(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(CorruptCheckpointError, match="header length"):
        FastSafetensorsLoader([tmp_path / "model.safetensors"])


def test_serve_loader_flag_reads_safetensors_through_it(serve, model_root: Path) -> None:  # type: ignore[no-untyped-def]
    server = serve(model_root, loader="fastsafetensors")
    with WeightClient(server.address) as client:
        state = client.fetch_state_dict("org/tiny-llama", rank=1, world_size=2)
        [listed] = client.list_models()
    assert listed.format == "safetensors"
    [entry] = server.server.cache.entries.values()
    assert isinstance(entry.loader, FastSafetensorsLoader)
    reference = {}
    for path in SafetensorsLoader.find_files(model_root / "org" / "tiny-llama"):
        reference |= load_file(str(path))
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(state[norm], reference[norm])
    q = reference["model.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(state["model.layers.1.self_attn.q_proj.weight"], q[q.shape[0] // 2 :])
