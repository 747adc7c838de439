"""`weightserve shard`: saved per-rank directories, their check, and serving them.

Every comparison is on raw bytes: a saved rank must hold exactly what `plan_shard` +
`read_range` give for that rank (and what a live server streams), bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import grpc
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.integration.faultkit import wait_until
from tests.sharding import fixtures as fx
from weightserve import FetchError, WeightClient
from weightserve.atomic import atomic_write
from weightserve.cli import main
from weightserve.errors import CorruptCheckpointError
from weightserve.loaders import loader_for
from weightserve.loaders.formats import model_files
from weightserve.loaders.pieces import ZEROS, Piece, read_range
from weightserve.loaders.sharded_state import INCOMPLETE_NAME, METADATA_NAME, RANK_FILE
from weightserve.sharding.model_config import ModelConfig
from weightserve.sharding.plan import plan_shard
from weightserve.sharding.sharded_state.plan import balance_parts, filter_shared
from weightserve.sharding.spec import ShardSpec
from weightserve.sharding.tensor_plan import TensorPlan
from weightserve.testing import (
    LlamaShape,
    deterministic_tensors,
    llama_tensor_shapes,
    write_llama_checkpoint,
    write_sharded_safetensors,
)
from weightserve.wire import torch_dtype

TINY_LLAMA = "org/tiny-llama"  # written by tests/conftest.py's model_root

Raw = dict[str, tuple[torch.dtype, tuple[int, ...], bytes]]


def raw(tensors: dict[str, torch.Tensor]) -> Raw:
    return {
        name: (t.dtype, tuple(t.shape), t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        for name, t in tensors.items()
    }


def write_json(obj: object, path: Path) -> None:
    path.write_text(json.dumps(obj))


@pytest.fixture(scope="module")
def models(model_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny Llama, a tiny Mixtral (8 experts) and a .bin Llama with tied embeddings."""
    root = tmp_path_factory.mktemp("canonical")
    mixtral = root / "org" / "tiny-mixtral"
    fx.mixtral(hidden=64, heads=4, kv_heads=2, intermediate=32, experts=8, layers=2, vocab=100).write(mixtral)
    atomic_write(mixtral / "tokenizer_config.json", partial(write_json, {"model_max_length": 64}))
    tied_shape = LlamaShape(64, 160, 1, 4, 2, 200, tie_word_embeddings=True)
    tied = deterministic_tensors(llama_tensor_shapes(tied_shape), seed=2)
    tied["lm_head.weight"] = tied["model.embed_tokens.weight"]  # one storage, two names
    (root / "org" / "tied-bin").mkdir()
    atomic_write(root / "org" / "tied-bin" / "pytorch_model.bin", partial(torch.save, tied))
    atomic_write(root / "org" / "tied-bin" / "config.json", partial(write_json, tied_shape.config_json()))
    return {"llama": model_root / TINY_LLAMA, "mixtral": mixtral, "tied": root / "org" / "tied-bin"}


def shard(model: Path, out: Path, world_size: int, *extra: str) -> Path:
    assert main(["shard", str(model), "--world-size", str(world_size), "--out", str(out), *extra]) == 0
    return out


def planned(model_dir: Path, rank: int, world_size: int, layout: str) -> Raw:
    """What plan_shard + read_range give for the rank, shared copies dropped."""
    found = model_files(model_dir)
    spec = ShardSpec(model="m", rank=rank, world_size=world_size, layout=layout)
    out: Raw = {}
    with loader_for(found.format)(found.files) as loader:
        for plan in filter_shared(plan_shard(loader.records, spec, ModelConfig.from_dir(model_dir))):
            buf = bytearray(plan.nbytes)
            read_range(plan, loader.sources, 0, memoryview(buf))
            out[plan.name] = (torch_dtype(plan.dtype), plan.shape, bytes(buf))
    return out


def saved_rank(saved: Path, rank: int) -> Raw:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(saved.glob(f"model-rank-{rank}-part-*.safetensors")):
        part = load_file(str(path))
        assert not set(part) & set(tensors), "a tensor is in two parts"
        tensors |= part
    return raw(tensors)


def check(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["shard", "--check", *argv])
    return code, capsys.readouterr().out


@pytest.mark.parametrize("layout", ["checkpoint", "vllm"])
@pytest.mark.parametrize(("model", "world_size"), [("llama", 2), ("llama", 4), ("mixtral", 2), ("mixtral", 4)])
def test_saved_ranks_are_the_planned_slices(
    models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    *,
    model: str,
    world_size: int,
    layout: str,
) -> None:
    cap = 6000
    out = shard(models[model], tmp_path / "out", world_size, "--layout", layout, "--max-part-size", str(cap))

    for rank in range(world_size):
        assert saved_rank(out, rank) == planned(models[model], rank, world_size, layout)
        for path in out.glob(f"model-rank-{rank}-part-*.safetensors"):
            with safe_open(path, "pt") as f:
                sizes = [f.get_slice(k).get_shape() for k in f.keys()]  # noqa: SIM118
            data = sum(2 * torch.Size(s).numel() for s in sizes)
            assert data <= cap or len(sizes) == 1, f"{path.name} holds {data} bytes over the {cap} cap"
    meta = json.loads((out / METADATA_NAME).read_text())
    assert (meta["world_size"], meta["layout"]) == (world_size, layout)
    assert meta["revision"] == model_files(models[model]).revision
    assert sorted(p.name for p in out.glob("*.json")) == sorted(
        [METADATA_NAME, *(p.name for p in models[model].glob("*.json") if "index" not in p.name)]
    )
    assert not (out / INCOMPLETE_NAME).exists()
    assert check(str(out), capsys=capsys)[0] == 0
    code, text = check(str(out), "--source", str(models[model]), capsys=capsys)
    assert code == 0, text


def test_served_saved_dir_equals_live_slicing(models: dict[str, Path], model_root: Path, tmp_path: Path, serve) -> None:
    saved_root = tmp_path / "saved"
    shard(models["llama"], saved_root / "org" / "llama-tp2", 2)
    shard(models["mixtral"], saved_root / "org" / "mixtral-tp2-vllm", 2, "--layout", "vllm")
    server = serve(model_root, models["mixtral"].parent.parent, saved_root)

    with WeightClient(server.address) as client:
        for rank in range(2):
            saved = raw(client.fetch_state_dict("org/llama-tp2", rank=rank, world_size=2))
            assert saved == raw(client.fetch_state_dict(TINY_LLAMA, rank=rank, world_size=2))
            assert saved == planned(models["llama"], rank, 2, "checkpoint")
            saved = raw(client.fetch_state_dict("org/mixtral-tp2-vllm", rank=rank, world_size=2, layout="vllm"))
            assert saved == raw(client.fetch_state_dict("org/tiny-mixtral", rank=rank, world_size=2, layout="vllm"))
        with pytest.raises(FetchError) as info:
            client.fetch_state_dict("org/llama-tp2", rank=0, world_size=4)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "world_size 2" in info.value.details()


@pytest.mark.fault("flipped bit in a saved shard")
def test_a_flipped_bit_in_a_part_fails_check_and_serving(
    models: dict[str, Path], tmp_path: Path, serve, capsys
) -> None:  # type: ignore[no-untyped-def]
    saved = shard(models["llama"], tmp_path / "models" / "org" / "llama-tp2", 2)
    meta = json.loads((saved / METADATA_NAME).read_text())
    assert set(meta["crc32c"]) == {"0", "1"} and all(meta["crc32c"].values())
    part = saved / "model-rank-1-part-0.safetensors"
    with safe_open(str(part), "pt") as f:
        victim = next(iter(f.keys()))
    # flip one bit in the victim's bytes: same size, valid header, other weights
    header_len = int.from_bytes(part.read_bytes()[:8], "little")
    offsets = json.loads(part.read_bytes()[8 : 8 + header_len])[victim]["data_offsets"]
    data = bytearray(part.read_bytes())
    data[8 + header_len + offsets[0]] ^= 0x01
    part.write_bytes(bytes(data))

    code, text = check(str(saved), capsys=capsys)
    assert code == 1 and f"{victim} does not match its recorded crc32c" in text
    server = serve(tmp_path / "models")
    with WeightClient(server.address) as client:
        manifest = client.get_manifest("org/llama-tp2", rank=1, world_size=2)
        assert all(t.HasField("crc32c") for t in manifest.tensors)  # recorded digests are in the manifest
        assert client.fetch_state_dict("org/llama-tp2", rank=0, world_size=2)  # rank 0 is intact
        with pytest.raises(FetchError) as info:
            client.fetch_state_dict("org/llama-tp2", rank=1, world_size=2)
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    assert victim in info.value.details() and "recorded" in info.value.details()


@pytest.mark.fault("saved shards missing a rank or tensor, or misshapen")
def test_check_names_a_deleted_rank_and_a_missing_tensor(models: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = shard(models["llama"], tmp_path / "out", 2)
    (part,) = out.glob("model-rank-0-part-*.safetensors")
    tensors = load_file(str(part))
    del tensors["model.norm.weight"]
    save_file(tensors, str(part), {"format": "pt"})

    code, text = check(str(out), capsys=capsys)
    assert code == 1
    assert "rank 0: 1 tensors missing that other ranks have: model.norm.weight" in text
    code, text = check(str(out), "--source", str(models["llama"]), capsys=capsys)
    assert code == 1
    assert "rank 0: 1 tensors missing: model.norm.weight" in text

    (out / "model-rank-1-part-0.safetensors").unlink()
    code, text = check(str(out), capsys=capsys)
    assert code == 1
    assert "rank 1: no model-rank-1-part-*.safetensors file" in text
    (out / METADATA_NAME).unlink()
    code, text = check(str(out), capsys=capsys)
    assert code == 1
    assert f"no {METADATA_NAME}" in text


@pytest.mark.fault("saved shards missing a rank or tensor, or misshapen")
def test_check_names_wrong_shapes(models: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = shard(models["llama"], tmp_path / "out", 2)
    for rank in range(2):  # the same wrong k_proj on every rank: only the head counts can tell
        path = out / f"model-rank-{rank}-part-0.safetensors"
        tensors = load_file(str(path))
        tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 64, dtype=torch.bfloat16)
        save_file(tensors, str(path), {"format": "pt"})

    code, text = check(str(out), capsys=capsys)
    assert code == 1
    assert "model.layers.0.self_attn.k_proj.weight: shape [32, 64]" in text
    code, text = check(str(out), "--source", str(models["llama"]), capsys=capsys)
    assert code == 1
    assert "rank 1: model.layers.0.self_attn.k_proj.weight is BF16[32, 64]; the source gives BF16[16, 64]" in text


def test_tied_bin_checkpoint_saves_one_copy(models: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = shard(models["tied"], tmp_path / "out", 2)

    for rank in range(2):
        saved = saved_rank(out, rank)
        assert "lm_head.weight" in saved  # the name vLLM's _filter_subtensors keeps
        assert "model.embed_tokens.weight" not in saved
        assert saved == planned(models["tied"], rank, 2, "checkpoint")
    assert check(str(out), "--source", str(models["tied"]), capsys=capsys)[0] == 0


def plan(name: str, *pieces: Piece) -> TensorPlan:
    return TensorPlan(name, "U8", (sum(p.nbytes for p in pieces),), pieces)


def test_filter_shared_keeps_the_larger_or_the_first_name() -> None:
    embed = plan("model.embed_tokens.weight", Piece(0, 0, 100))
    tied = plan("lm_head.weight", Piece(0, 0, 100))
    inner = plan("a.view", Piece(0, 10, 20))
    strided = plan("b.cols", Piece(0, 0, 5, rows=4, stride=25))  # inside embed, every 25th byte run
    partial_overlap = plan("c.tail", Piece(0, 90, 30))
    elsewhere = plan("d.other", Piece(1, 0, 100))
    padding = plan("e.pad", Piece(ZEROS, 0, 100))

    kept = filter_shared([embed, tied, inner, strided, partial_overlap, elsewhere, padding])

    assert [p.name for p in kept] == ["lm_head.weight", "c.tail", "d.other", "e.pad"]
    assert filter_shared([embed, inner]) == [embed]
    assert filter_shared([plan("x", Piece(0, 0, 5, rows=2, stride=10)), plan("y", Piece(0, 5, 5))]) == [
        plan("x", Piece(0, 0, 5, rows=2, stride=10)),
        plan("y", Piece(0, 5, 5)),
    ]  # interleaved rows share no byte


@given(st.lists(st.integers(0, 300), max_size=40), st.one_of(st.none(), st.integers(1, 200)))
def test_balance_parts_places_every_tensor_once_within_the_cap(sizes: list[int], cap: int | None) -> None:
    parts = balance_parts(sizes, cap)

    assert sorted(i for part in parts for i in part) == list(range(len(sizes)))
    assert sum(sizes[i] for part in parts for i in part) == sum(sizes)
    assert all(part == sorted(part) for part in parts)
    if cap is None:
        assert parts == [list(range(len(sizes)))]
    else:
        assert all(sum(sizes[i] for i in part) <= cap or len(part) == 1 for part in parts)
        assert len(parts) <= max(1, sum(1 for s in sizes if s > cap) + 2 * -(-sum(sizes) // cap))


def test_balance_parts_examples() -> None:
    assert balance_parts([5, 1, 4, 2], 6) == [[0, 1], [2, 3]]
    assert balance_parts([50, 3, 3], 10) == [[0], [1, 2]]  # too big for any part: one of its own
    assert balance_parts([], 10) == [[]]


STALL_AFTER_FIRST_PART = """
import os, sys, time
_fsync = os.fsync
_ready = sys.argv.pop(1)
def fsync(fd):
    path = os.readlink(f"/proc/self/fd/{fd}")
    done = [n for n in os.listdir(os.path.dirname(path)) if n.startswith("model-rank-")]
    if "model-rank-" in os.path.basename(path) and done:
        open(_ready, "w").close()  # one part is complete, the next is written but not renamed: stall
        time.sleep(600)
    _fsync(fd)
os.fsync = fsync
from weightserve.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.fault("`weightserve shard` killed mid-write")
def test_killed_shard_leaves_only_complete_files(tmp_path: Path, capsys) -> None:
    model = tmp_path / "model"
    write_llama_checkpoint(model, LlamaShape(128, 256, 4, 4, 2, 1000), num_files=1)
    out, ready = tmp_path / "out", tmp_path / "stalled"
    argv = ["shard", str(model), "--world-size", "2", "--out", str(out), "--max-part-size", "40000"]
    proc = subprocess.Popen(
        [sys.executable, "-c", STALL_AFTER_FIRST_PART, str(ready), *argv], stdout=subprocess.DEVNULL
    )
    try:
        wait_until(lambda: ready.exists() or proc.poll() is not None, 60, "the first part's fsync")
        assert proc.poll() is None, "shard ended before writing a part"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    assert not (out / METADATA_NAME).exists()
    rank_files = [p for p in out.iterdir() if RANK_FILE.match(p.name)]
    assert rank_files and any(p.name.endswith(".part") for p in out.iterdir())  # killed between two parts
    for path in rank_files:
        with safe_open(path, "pt") as f:
            for key in f.keys():  # noqa: SIM118
                f.get_tensor(key)
    others = {p.name for p in out.iterdir()} - {p.name for p in rank_files} - {INCOMPLETE_NAME}
    assert all(name.startswith(".") and name.endswith(".part") for name in others), others
    with pytest.raises(CorruptCheckpointError, match="did not finish"):
        loader_for("sharded_state")(sorted(rank_files))
    code, text = check(str(out), capsys=capsys)
    assert code == 1
    assert f"no {METADATA_NAME}" in text


def test_tied_model_in_vllm_layout_saves_the_embedding_as_lm_head(tmp_path: Path, model_root: Path) -> None:
    """vLLM ties lm_head to the embedding and its loader keeps the smaller name of the two."""
    tied_shape = LlamaShape(64, 160, 1, 4, 2, 256, tie_word_embeddings=True)
    model = tmp_path / "org" / "tied"
    tensors = deterministic_tensors(llama_tensor_shapes(tied_shape), seed=3)
    assert "lm_head.weight" not in tensors  # a tied checkpoint stores the embedding only
    write_sharded_safetensors(tensors, model, num_files=1)
    atomic_write(model / "config.json", partial(write_json, tied_shape.config_json()))
    out = shard(model, tmp_path / "tied-vllm", 2, "--layout", "vllm")
    for rank in range(2):
        [part] = sorted(out.glob(f"model-rank-{rank}-part-*.safetensors"))
        saved = load_file(part)
        assert "lm_head.weight" in saved and "model.embed_tokens.weight" not in saved
        rows = 256 // 2
        expected = tensors["model.embed_tokens.weight"][rank * rows : (rank + 1) * rows]
        assert torch.equal(saved["lm_head.weight"].view(torch.uint8), expected.view(torch.uint8))
    assert main(["shard", "--check", str(out)]) == 0
