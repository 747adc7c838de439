"""Dummy weights: deterministic, computed per byte range, served like any checkpoint."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from weightserve.cli import build_parser
from weightserve.client import WeightClient
from weightserve.config import ServerConfig, parse_setting
from weightserve.errors import CorruptCheckpointError
from weightserve.loaders import FORMAT_PREFERENCE, loader_for
from weightserve.loaders.dummy import DummyLoader, dummy_locations, dummy_values, name_seed, splitmix64
from weightserve.loaders.dummy_shapes import tensor_shapes
from weightserve.loaders.formats import files_at
from weightserve.testing import LlamaShape, llama_tensor_shapes
from weightserve.wire import torch_dtype

SHAPE = LlamaShape(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=100,
)  # fmt: skip
MASK = (1 << 64) - 1


def splitmix64_reference(seed: int, n: int) -> list[int]:
    """Sebastiano Vigna's splitmix64.c, one output at a time."""
    out, state = [], seed
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & MASK
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        out.append(z ^ (z >> 31))
    return out


def write_config(path: Path, **fields: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**SHAPE.config_json(), **fields}))
    return path


@pytest.fixture
def dummy_config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "config.json")


def read(loader: DummyLoader, name: str, start: int = 0, length: int | None = None) -> bytes:
    record = next(r for r in loader.records if r.name == name)
    length = record.nbytes - start if length is None else length
    buf = bytearray(length)
    loader.sources[record.source].read_into(record.offset + start, memoryview(buf))
    return bytes(buf)


def test_splitmix64_is_the_reference_generator() -> None:
    assert [int(x) for x in splitmix64(0, 0, 2)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
    seed = name_seed("model.layers.0.self_attn.q_proj.weight")
    assert [int(x) for x in splitmix64(seed, 0, 50)] == splitmix64_reference(seed, 50)
    assert [int(x) for x in splitmix64(seed, 37, 40)] == splitmix64_reference(seed, 40)[37:]


def test_values_are_pinned_across_processes_and_versions() -> None:
    # A change here would make servers of two versions serve different dummy weights.
    seed = name_seed("model.embed_tokens.weight")
    digests = [
        hashlib.sha256(dummy_values(seed, 0, 1000, t).tobytes()).hexdigest()[:16] for t in ("BF16", "F16", "F32")
    ]
    assert digests == ["07410a86df0897a3", "52f747ba5cc12f52", "1b69ad44573d93fb"]


def test_shapes_come_from_the_config() -> None:
    llama = tensor_shapes(SHAPE.config_json())
    assert llama == llama_tensor_shapes(SHAPE) and list(llama) == list(llama_tensor_shapes(SHAPE))
    qwen = tensor_shapes({**SHAPE.config_json(), "model_type": "qwen2", "tie_word_embeddings": True})
    assert qwen["model.layers.1.self_attn.k_proj.bias"] == (32,) and "lm_head.weight" not in qwen
    mixtral = tensor_shapes({**SHAPE.config_json(), "model_type": "mixtral", "num_local_experts": 3})
    assert mixtral["model.layers.0.block_sparse_moe.experts.2.w2.weight"] == (64, 128)
    assert mixtral["model.layers.0.block_sparse_moe.gate.weight"] == (3, 64)
    assert not any("mlp." in name for name in mixtral)
    with pytest.raises(ValueError, match="gpt2"):
        tensor_shapes({"model_type": "gpt2"})


def test_reads_agree_across_loaders_and_ranges(dummy_config: Path) -> None:
    name = "model.layers.1.mlp.down_proj.weight"
    with DummyLoader([dummy_config]) as a, DummyLoader([dummy_config]) as b:
        full = read(a, name)
        assert read(a, name) == full == read(b, name)
        rng = np.random.default_rng(0)
        for _ in range(50):
            start = int(rng.integers(0, len(full)))
            length = int(rng.integers(0, len(full) - start + 1))
            assert read(b, name, start, length) == full[start : start + length]
        assert read(a, "model.norm.weight") != read(a, "model.layers.0.input_layernorm.weight")
        assert a.model_config_dict() == SHAPE.config_json()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_values_stay_within_bounds(tmp_path: Path, dtype: str) -> None:
    with DummyLoader([write_config(tmp_path / "c.json", torch_dtype=dtype)]) as loader:
        record = loader.records[0]
        values = torch.frombuffer(bytearray(read(loader, record.name)), dtype=torch_dtype(record.dtype)).double()
    assert record.dtype == {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[dtype]
    assert values.abs().max() <= 1e-3 and values.abs().max() > 0.9e-3
    assert values.unique().numel() > 100


def test_revision_is_the_same_for_the_same_config_and_nothing_is_written(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.json")
    copy = write_config(tmp_path / "elsewhere.json")
    before = sorted(tmp_path.rglob("*"))
    first, second = dummy_locations([("org/m", config)])["org/m"], dummy_locations([("org/m", copy)])["org/m"]
    assert files_at(first).revision == files_at(second).revision and first.revision
    assert files_at(first).format == "dummy" and "dummy" not in FORMAT_PREFERENCE  # never found by scanning
    assert loader_for("dummy") is DummyLoader
    assert sorted(tmp_path.rglob("*")) == before
    changed = write_config(tmp_path / "wider.json", hidden_size=128)
    assert dummy_locations([("org/m", changed)])["org/m"].revision != first.revision
    # the bytes a model serves are its generated tensors', not its config file's
    shapes = tensor_shapes(SHAPE.config_json())
    assert files_at(first).total_bytes == sum(math.prod(shape) * 2 for shape in shapes.values())


def test_bad_names_and_configs_are_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.json")
    for name in ("../x", "/abs", ".hidden", "a/b/c/d"):
        with pytest.raises(ValueError, match="relative path"):
            dummy_locations([(name, config)])
    with pytest.raises(ValueError, match="num_attention_heads"):
        dummy_locations([("m", write_config(tmp_path / "bad.json", num_attention_heads=None))])
    with pytest.raises(ValueError, match="given twice"):
        dummy_locations([("m", config), ("m", config)])
    with pytest.raises(CorruptCheckpointError):
        DummyLoader([tmp_path / "missing" / "config.json"])


def test_flags_and_environment(tmp_path: Path) -> None:
    env = {"WEIGHTSERVE_DUMMY": "a=x.json, org/b=y.json", "WEIGHTSERVE_LOADER": "fastsafetensors"}
    config = ServerConfig.from_env(env)
    assert config.dummy == (("a", Path("x.json")), ("org/b", Path("y.json")))
    assert config.loader == "fastsafetensors"
    args = build_parser().parse_args(["serve", "--dummy", "a=x.json", "--dummy", "b=y.json", "--loader", "safetensors"])
    # flags are text the configuration parses, as it parses the variable (cli/serve.py)
    assert parse_setting("dummy", args.dummy) == (("a", Path("x.json")), ("b", Path("y.json")))
    assert args.loader == "safetensors"
    with pytest.raises(ValueError, match="loader"):
        ServerConfig(loader="nope")


def test_served_ranks_gather_to_the_full_tensors(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = write_config(tmp_path / "configs" / "tiny.json")
    (tmp_path / "configs" / "secret.txt").write_text("not the model's")
    server = serve(dummy=(("dummy/tiny", config),))
    with WeightClient(server.address) as client:
        [listed] = client.list_models()
        assert (listed.name, listed.format) == ("dummy/tiny", "dummy")
        assert listed.total_bytes == sum(math.prod(s) * 2 for s in llama_tensor_shapes(SHAPE).values())
        files = client.fetch_files("dummy/tiny", tmp_path / "fetched")
        assert [f.name for f in files] == ["config.json"] and files[0].read_bytes() == config.read_bytes()
        full = client.fetch_state_dict("dummy/tiny")
        ranks = [client.fetch_state_dict("dummy/tiny", rank=r, world_size=2) for r in range(2)]
    assert set(full) == set(llama_tensor_shapes(SHAPE))
    split_dims = {
        "model.layers.0.self_attn.q_proj.weight": 0, "model.layers.1.self_attn.o_proj.weight": 1,
        "model.layers.1.mlp.up_proj.weight": 0, "model.norm.weight": None,
    }  # fmt: skip
    for name, dim in split_dims.items():
        if dim is None:
            assert all(torch.equal(r[name], full[name]) for r in ranks)
        else:
            assert torch.equal(torch.cat([r[name] for r in ranks], dim=dim), full[name]), name
    embed = torch.cat([r["model.embed_tokens.weight"] for r in ranks])  # vocabulary padded to 128 rows
    assert torch.equal(embed[:100], full["model.embed_tokens.weight"]) and not embed[100:].any()
