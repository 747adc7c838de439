"""Tensor-parallel slices of a GGUF model: cut on whole rows or whole blocks, else INVALID_ARGUMENT.

A GGUF directory has no config.json here, so the head counts come from GGUF metadata.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from tests.loaders.gguf_fixtures import Written, write_llama_gguf
from weightserve.client import WeightClient
from weightserve.errors import FetchError, InvalidRequestError
from weightserve.loaders.gguf import GGUFLoader
from weightserve.loaders.pieces import read_range
from weightserve.sharding.model_config import ModelConfig
from weightserve.sharding.plan import plan_shard
from weightserve.sharding.spec import ShardSpec
from weightserve.sharding.tensor_plan import TensorPlan

O_PROJ = "model.layers.0.self_attn.o_proj.weight"  # Q8_0 [64, 2 blocks of 34 bytes], split on dim 1
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"  # Q8_0, permuted in the file, split on dim 0
DOWN = "model.layers.1.mlp.down_proj.weight"  # Q4_K [64, 2 blocks of 144 bytes], split on dim 1


@pytest.fixture(scope="module")
def gguf_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Written]:
    root = tmp_path_factory.mktemp("gguf-root")
    return root, write_llama_gguf(root / "org" / "tiny-gguf")


def rank_tensors(loader: GGUFLoader, rank: int, world_size: int) -> dict[str, tuple[TensorPlan, bytes]]:
    raw = loader.model_config_dict()
    assert raw is not None
    spec = ShardSpec("m", rank=rank, world_size=world_size)
    out = {}
    for plan in plan_shard(loader.records, spec, ModelConfig.from_dict(raw)):
        buf = bytearray(plan.nbytes)
        read_range(plan, loader.sources, 0, memoryview(buf))
        out[plan.name] = (plan, bytes(buf))
    return out


def expected(written: Written, name: str) -> np.ndarray:
    _, shape, data = written.expected[name]
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def test_quantized_tensors_split_on_blocks_at_world_size_2(gguf_root: tuple[Path, Written]) -> None:
    root, written = gguf_root
    with GGUFLoader(GGUFLoader.find_files(root / "org" / "tiny-gguf")) as loader:
        ranks = [rank_tensors(loader, rank, 2) for rank in range(2)]
    for name, qtype in ((O_PROJ, T.Q8_0), (DOWN, T.Q4_K)):
        full = expected(written, name)
        half = full.shape[1] // 2
        for rank, tensors in enumerate(ranks):
            plan, data = tensors[name]
            part = np.frombuffer(data, dtype=np.uint8).reshape(plan.shape)
            np.testing.assert_array_equal(part, full[:, rank * half : (rank + 1) * half])
            columns = dequantize(full, qtype).shape[1] // 2
            np.testing.assert_array_equal(
                dequantize(part, qtype), dequantize(full, qtype)[:, rank * columns : (rank + 1) * columns]
            )
    q = expected(written, Q_PROJ)  # Hugging Face row order, after un-permuting
    for rank, tensors in enumerate(ranks):
        assert tensors[Q_PROJ][1] == q[rank * 32 : (rank + 1) * 32].tobytes()


def test_a_cut_through_a_block_is_invalid(gguf_root: tuple[Path, Written]) -> None:
    root, _ = gguf_root
    with (
        GGUFLoader(GGUFLoader.find_files(root / "org" / "tiny-gguf")) as loader,
        pytest.raises(InvalidRequestError, match=r"Q8_0 tensor '.*o_proj.weight'.*34-byte quantization block"),
    ):
        rank_tensors(loader, 0, 4)  # 68 bytes per row / 4 = 17: half a Q8_0 block


def test_served_without_config_json_and_gathered_across_ranks(serve, gguf_root: tuple[Path, Written]) -> None:  # type: ignore[no-untyped-def]
    root, written = gguf_root
    server = serve(root)
    with WeightClient(server.address) as client:
        [listed] = client.list_models()
        assert (listed.name, listed.format) == ("org/tiny-gguf", "gguf")
        whole = client.fetch_state_dict("org/tiny-gguf")
        parts = [client.fetch_state_dict("org/tiny-gguf", rank=r, world_size=2) for r in range(2)]
        with pytest.raises(FetchError) as refused:
            client.fetch_state_dict("org/tiny-gguf", rank=0, world_size=4)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for name, (_, shape, data) in written.expected.items():
        assert tuple(whole[name].shape) == shape
        assert whole[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() == data
    gathered = np.concatenate([parts[r][O_PROJ].numpy() for r in range(2)], axis=1)
    np.testing.assert_array_equal(gathered, expected(written, O_PROJ))
    q = np.concatenate([parts[r][Q_PROJ].numpy() for r in range(2)])  # 2 of SHAPE's 4 heads each
    np.testing.assert_array_equal(q, expected(written, Q_PROJ))
