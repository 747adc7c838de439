"""Tensor- and pipeline-parallel fetches over a real server on loopback.

What a rank fetches must be what plan_shard + read_range give locally, byte for byte,
and an impossible split must come back as INVALID_ARGUMENT naming the numbers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from tests.sharding import fixtures as fx
from weightserve.client import WeightClient
from weightserve.errors import FetchError
from weightserve.sharding.spec import ShardSpec

MODEL = "org/tiny-llama"


@pytest.fixture
def client(serve: Any, model_root: Path) -> Iterator[WeightClient]:
    server = serve(model_root, chunk_bytes=4096)  # small chunks: strided slices cross many chunks
    with WeightClient(server.address) as c:
        yield c


def _check_rank(client: WeightClient, model_root: Path, **spec: object) -> dict[str, int]:
    plans, local = fx.rank_state(model_root / MODEL, ShardSpec(MODEL, **spec))  # type: ignore[arg-type]
    shard = {k: spec[k] for k in ("rank", "world_size", "layout", "pp_rank", "pp_size") if k in spec}
    manifest = client.get_manifest(MODEL, **shard)  # type: ignore[arg-type]
    assert [(t.name, tuple(t.shape), t.nbytes) for t in manifest.tensors] == [
        (p.name, p.shape, p.nbytes) for p in plans
    ]
    fetched = client.fetch_state_dict(MODEL, **shard)  # type: ignore[arg-type]
    assert list(fetched) == [p.name for p in plans]
    for name, tensor in local.items():
        assert fx.same_bytes(fetched[name], tensor), name
    assert client.last_stats is not None
    return {"payload": client.last_stats.payload_bytes, "bytes": sum(p.nbytes for p in plans)}


@pytest.mark.parametrize("layout", ["checkpoint", "vllm"])
def test_each_rank_fetches_its_local_plan(client: WeightClient, model_root: Path, layout: str) -> None:
    for rank in range(2):
        _check_rank(client, model_root, rank=rank, world_size=2, layout=layout)


def test_pipeline_stages_through_the_client(client: WeightClient, model_root: Path) -> None:
    # TINY_LLAMA has 2 layers: stage 0 runs layer 0 (and the embedding), stage 1 layer 1 and the head.
    for world_size in (1, 2):
        for pp_rank in range(2):
            _check_rank(client, model_root, rank=0, world_size=world_size, pp_rank=pp_rank, pp_size=2)
    first = client.get_manifest(MODEL, pp_rank=0, pp_size=2)
    last = client.get_manifest(MODEL, pp_rank=1, pp_size=2)
    assert {t.name.split(".")[2] for t in first.tensors if t.name.startswith("model.layers.")} == {"0"}
    assert {t.name.split(".")[2] for t in last.tensors if t.name.startswith("model.layers.")} == {"1"}
    assert "model.embed_tokens.weight" in {t.name for t in first.tensors}
    assert {"model.norm.weight", "lm_head.weight"} <= {t.name for t in last.tensors}
    assert not {"model.norm.weight", "lm_head.weight"} & {t.name for t in first.tensors}


@pytest.mark.parametrize(
    ("world_size", "numbers"),
    [(8, ("num_attention_heads 4", "world_size 8")), (3, ("world_size 3",))],
)
def test_impossible_split_is_invalid_argument(client: WeightClient, world_size: int, numbers: tuple[str, ...]) -> None:
    for call in (
        lambda: client.get_manifest(MODEL, rank=0, world_size=world_size),
        lambda: client.fetch_state_dict(MODEL, rank=0, world_size=world_size),
    ):
        with pytest.raises(FetchError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for number in numbers:
            assert number in str(err.value), str(err.value)


def test_all_ranks_fetch_the_model_once_plus_allowed_duplicates(client: WeightClient, model_root: Path) -> None:
    # conftest's TINY_LLAMA: hidden 64, 4 heads of 16, 2 k/v heads, intermediate 160, V 200,
    # 2 layers, bf16. At W = 4 each rank holds one k/v head (2 ranks per head), V pads to 256 rows.
    world_size = 4
    s = SimpleNamespace(**json.loads((model_root / MODEL / "config.json").read_text()))
    assert (s.hidden_size, s.num_attention_heads, s.num_key_value_heads, s.vocab_size) == (64, 4, 2, 200)
    head_dim = s.hidden_size // s.num_attention_heads
    kv_rows = s.num_key_value_heads * head_dim
    per_layer = (
        2 * s.hidden_size * s.hidden_size + 2 * kv_rows * s.hidden_size + 3 * s.intermediate_size * s.hidden_size
    )
    norms = (2 * s.num_hidden_layers + 1) * s.hidden_size
    model = 2 * (2 * s.vocab_size * s.hidden_size + s.num_hidden_layers * per_layer + norms)
    replicated = 2 * norms * (world_size - 1)
    kv_replicas = 2 * s.num_hidden_layers * 2 * (world_size - s.num_key_value_heads) * head_dim * s.hidden_size
    padding = 2 * 2 * (256 - s.vocab_size) * s.hidden_size
    assert model == sum(p.stat().st_size for p in (model_root / MODEL).glob("*.safetensors")) - sum(
        _header_bytes(p) for p in (model_root / MODEL).glob("*.safetensors")
    )
    results = [_check_rank(client, model_root, rank=r, world_size=world_size) for r in range(world_size)]
    assert sum(r["payload"] for r in results) == model + replicated + kv_replicas + padding
    assert all(r["payload"] == r["bytes"] for r in results)


def _header_bytes(path: Path) -> int:
    with path.open("rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_operator_rules_file_reaches_the_server(serve: Any, tmp_path: Path) -> None:
    root = tmp_path / "models"
    gpt2 = fx.gpt2_like()
    originals = gpt2.write(root / "org" / "gpt2")
    rules = tmp_path / "gpt2.toml"
    rules.write_text(
        "[[rules]]\npattern = 'wte\\.weight$'\nvocab = true\n"
        "[[rules]]\npattern = '\\.(c_attn|c_fc)\\.weight$'\ndim = 1\n"
        "[[rules]]\npattern = '\\.(c_attn|c_fc)\\.bias$'\ndim = 0\n"
        "[[rules]]\npattern = '\\.c_proj\\.weight$'\ndim = 0\n"
        "[[rules]]\npattern = '.'\nreplicated = true\n"
    )
    with WeightClient(serve(root).address) as plain:
        with pytest.raises(FetchError) as err:
            plain.get_manifest("org/gpt2", rank=0, world_size=2)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "gpt2" in str(err.value)
    with WeightClient(serve(root, sharding_rules=rules).address) as ruled:
        state = ruled.fetch_state_dict("org/gpt2", rank=1, world_size=2)
    c_fc = originals["transformer.h.0.mlp.c_fc.weight"]
    assert fx.same_bytes(state["transformer.h.0.mlp.c_fc.weight"], c_fc[:, 64:])
    assert fx.same_bytes(state["transformer.wpe.weight"], originals["transformer.wpe.weight"])
