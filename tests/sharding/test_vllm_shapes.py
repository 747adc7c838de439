"""layout="vllm": every rank's tensors have the shapes vLLM's parallel layers allocate.

The tables below are LITERAL, worked out by hand from vLLM's layer code
(vllm/model_executor/layers/linear.py, vocab_parallel_embedding.py, fused_moe/layer.py),
never from our own rules:

- QKVParallelLinear: num_heads = total_num_heads / tp; if tp >= total_num_kv_heads then
  num_kv_heads = 1 (num_kv_head_replicas = tp / total_num_kv_heads) else
  total_num_kv_heads / tp; weight [(num_heads + 2 * num_kv_heads) * head_size, hidden].
- MergedColumnParallelLinear (gate_up_proj): output_partition_sizes = [I / tp, I / tp],
  weight [2 * I / tp, hidden].
- RowParallelLinear (o_proj, down_proj): input_size_per_partition = input_size / tp,
  weight [output_size, input_size / tp].
- VocabParallelEmbedding / ParallelLMHead: pad_vocab_size(V, 64) =
  ((V + 63) // 64) * 64; num_embeddings_per_partition = padded / tp; weight
  [padded / tp, hidden].
- FusedMoE: intermediate_size_per_partition = I / tp; w13_weight
  [E, 2 * I / tp, hidden], w2_weight [E, hidden, I / tp].
- ReplicatedLinear (Mixtral's router gate): [E, hidden]; RMSNorm: [hidden].
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from tests.sharding import fixtures as fx
from weightserve.sharding.plan import plan_shard
from weightserve.sharding.spec import ShardSpec

Table = dict[int, dict[str, tuple[int, ...]]]

# Llama, GQA: hidden 128, 16 heads, 4 k/v heads, head_dim 8, intermediate 256, V 1000
# (padded to 1024), 2 layers, untied. At tp 8 each k/v head is held by 2 ranks.
LLAMA = fx.llama(hidden=128, heads=16, kv_heads=4, intermediate=256, vocab=1000, layers=2, rotary=False)

LLAMA_LAYER: dict[int, dict[str, tuple[int, ...]]] = {
    1: {
        "input_layernorm.weight": (128,),
        "self_attn.qkv_proj.weight": (192, 128),  # (16 + 2 * 4) * 8
        "self_attn.o_proj.weight": (128, 128),  # [hidden, 16 * 8 / 1]
        "post_attention_layernorm.weight": (128,),
        "mlp.gate_up_proj.weight": (512, 128),  # 2 * 256 / 1
        "mlp.down_proj.weight": (128, 256),  # [hidden, 256 / 1]
    },
    2: {
        "input_layernorm.weight": (128,),
        "self_attn.qkv_proj.weight": (96, 128),  # (8 + 2 * 2) * 8
        "self_attn.o_proj.weight": (128, 64),
        "post_attention_layernorm.weight": (128,),
        "mlp.gate_up_proj.weight": (256, 128),
        "mlp.down_proj.weight": (128, 128),
    },
    4: {
        "input_layernorm.weight": (128,),
        "self_attn.qkv_proj.weight": (48, 128),  # (4 + 2 * 1) * 8
        "self_attn.o_proj.weight": (128, 32),
        "post_attention_layernorm.weight": (128,),
        "mlp.gate_up_proj.weight": (128, 128),
        "mlp.down_proj.weight": (128, 64),
    },
    8: {
        "input_layernorm.weight": (128,),
        "self_attn.qkv_proj.weight": (32, 128),  # (2 + 2 * 1) * 8: tp 8 >= 4 kv heads -> 1 each
        "self_attn.o_proj.weight": (128, 16),
        "post_attention_layernorm.weight": (128,),
        "mlp.gate_up_proj.weight": (64, 128),
        "mlp.down_proj.weight": (128, 32),
    },
}
LLAMA_ENDS: dict[int, dict[str, tuple[int, ...]]] = {
    1: {"model.embed_tokens.weight": (1024, 128), "model.norm.weight": (128,), "lm_head.weight": (1024, 128)},
    2: {"model.embed_tokens.weight": (512, 128), "model.norm.weight": (128,), "lm_head.weight": (512, 128)},
    4: {"model.embed_tokens.weight": (256, 128), "model.norm.weight": (128,), "lm_head.weight": (256, 128)},
    8: {"model.embed_tokens.weight": (128, 128), "model.norm.weight": (128,), "lm_head.weight": (128, 128)},
}

# Mixtral: hidden 64, 8 heads, 2 k/v heads, head_dim 8, 8 experts of intermediate 128,
# V 500 (padded to 512), 2 layers. At tp 4 and 8 k/v heads replicate.
MIXTRAL = fx.mixtral(hidden=64, heads=8, kv_heads=2, intermediate=128, experts=8, vocab=500, layers=2)

MIXTRAL_LAYER: dict[int, dict[str, tuple[int, ...]]] = {
    1: {
        "input_layernorm.weight": (64,),
        "self_attn.qkv_proj.weight": (96, 64),  # (8 + 2 * 2) * 8
        "self_attn.o_proj.weight": (64, 64),
        "post_attention_layernorm.weight": (64,),
        "block_sparse_moe.gate.weight": (8, 64),
        "block_sparse_moe.experts.w13_weight": (8, 256, 64),  # [E, 2 * 128 / 1, H]
        "block_sparse_moe.experts.w2_weight": (8, 64, 128),  # [E, H, 128 / 1]
    },
    2: {
        "input_layernorm.weight": (64,),
        "self_attn.qkv_proj.weight": (48, 64),  # (4 + 2 * 1) * 8
        "self_attn.o_proj.weight": (64, 32),
        "post_attention_layernorm.weight": (64,),
        "block_sparse_moe.gate.weight": (8, 64),
        "block_sparse_moe.experts.w13_weight": (8, 128, 64),
        "block_sparse_moe.experts.w2_weight": (8, 64, 64),
    },
    4: {
        "input_layernorm.weight": (64,),
        "self_attn.qkv_proj.weight": (32, 64),  # (2 + 2 * 1) * 8: tp 4 >= 2 kv heads
        "self_attn.o_proj.weight": (64, 16),
        "post_attention_layernorm.weight": (64,),
        "block_sparse_moe.gate.weight": (8, 64),
        "block_sparse_moe.experts.w13_weight": (8, 64, 64),
        "block_sparse_moe.experts.w2_weight": (8, 64, 32),
    },
    8: {
        "input_layernorm.weight": (64,),
        "self_attn.qkv_proj.weight": (24, 64),  # (1 + 2 * 1) * 8
        "self_attn.o_proj.weight": (64, 8),
        "post_attention_layernorm.weight": (64,),
        "block_sparse_moe.gate.weight": (8, 64),
        "block_sparse_moe.experts.w13_weight": (8, 32, 64),
        "block_sparse_moe.experts.w2_weight": (8, 64, 16),
    },
}
MIXTRAL_ENDS: dict[int, dict[str, tuple[int, ...]]] = {
    1: {"model.embed_tokens.weight": (512, 64), "model.norm.weight": (64,), "lm_head.weight": (512, 64)},
    2: {"model.embed_tokens.weight": (256, 64), "model.norm.weight": (64,), "lm_head.weight": (256, 64)},
    4: {"model.embed_tokens.weight": (128, 64), "model.norm.weight": (64,), "lm_head.weight": (128, 64)},
    8: {"model.embed_tokens.weight": (64, 64), "model.norm.weight": (64,), "lm_head.weight": (64, 64)},
}


def expected_table(layer: dict[str, tuple[int, ...]], ends: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    table = dict(ends)
    for i in range(2):
        table |= {f"model.layers.{i}.{name}": shape for name, shape in layer.items()}
    return table


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize(
    ("family", "layer", "ends"),
    [(LLAMA, LLAMA_LAYER, LLAMA_ENDS), (MIXTRAL, MIXTRAL_LAYER, MIXTRAL_ENDS)],
    ids=["llama", "mixtral"],
)
def test_vllm_layout_shapes_match_vllm_layers(family: Any, layer: Table, ends: Table, tp: int) -> None:
    expected = expected_table(layer[tp], ends[tp])
    records = fx.records_of(family)
    for rank in range(tp):
        plans = plan_shard(records, ShardSpec("m", rank=rank, world_size=tp, layout="vllm"), family.model_config)
        got = {p.name: p.shape for p in plans}
        assert got == expected, f"rank {rank} of {tp}"
        assert {p.dtype for p in plans} == {"BF16"}
        for plan in plans:
            assert plan.nbytes == 2 * math.prod(plan.shape), plan.name


def test_vllm_layout_tensor_order_is_embeddings_layers_head() -> None:
    plans = plan_shard(fx.records_of(LLAMA), ShardSpec("m", rank=0, world_size=2, layout="vllm"), LLAMA.model_config)
    names = [p.name for p in plans]
    assert names[0] == "model.embed_tokens.weight"
    assert set(names[-2:]) == {"model.norm.weight", "lm_head.weight"}
    layer_of = [int(n.split(".")[2]) for n in names[1:-2]]
    assert layer_of == sorted(layer_of)
