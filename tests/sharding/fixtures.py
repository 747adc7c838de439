"""Tiny checkpoints of every family the slicing rules know, and helpers to read plans.

Every tensor holds distinct bit patterns (an arange over its raw integer view, offset
per tensor), so a slice taken from the wrong rows, columns or tensor never matches by
accident; comparisons are on raw bytes, so NaN payloads in 16-bit patterns count.

Test modules load this file by path under a unique module name, because tests/ has
no packages and another test directory may hold a `fixtures.py` too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weightserve.atomic import atomic_write
from weightserve.loaders.base import TensorRecord
from weightserve.loaders.pieces import read_range
from weightserve.loaders.safetensors import SafetensorsLoader
from weightserve.sharding.model_config import ModelConfig
from weightserve.sharding.plan import plan_shard
from weightserve.sharding.spec import ShardSpec
from weightserve.sharding.tensor_plan import TensorPlan
from weightserve.testing import write_sharded_safetensors
from weightserve.wire import torch_dtype

WORLD_SIZES = (1, 2, 4, 8)


def distinct(shape: tuple[int, ...], dtype: torch.dtype, salt: int) -> torch.Tensor:
    """A tensor whose elements are distinct bit patterns (per tensor, thanks to `salt`)."""
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    values = torch.arange(numel, dtype=torch.int64) * 3 + salt * 7919 + 1
    if itemsize == 1:
        return (values % 256).to(torch.uint8).view(dtype).reshape(shape)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[itemsize]
    if itemsize < 8:
        half = 1 << (8 * itemsize - 1)
        values = (values + half) % (2 * half) - half  # wrap into the signed range
    return values.to(bits).view(dtype).reshape(shape)


@dataclass(frozen=True)
class Family:
    """One tiny checkpoint: its config.json, tensor names and shapes, and its dtype."""

    key: str
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    dtype: torch.dtype
    extra_dtypes: dict[str, torch.dtype] = field(default_factory=dict)

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.config)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            name: distinct(shape, self.extra_dtypes.get(name, self.dtype), salt)
            for salt, (name, shape) in enumerate(self.shapes.items())
        }

    def write(self, out_dir: Path, num_files: int = 2) -> dict[str, torch.Tensor]:
        """Write safetensors files, the index and config.json; returns what was written."""
        tensors = self.tensors()
        write_sharded_safetensors(tensors, out_dir, num_files)
        atomic_write(out_dir / "config.json", partial(_write_json, self.config))
        return tensors


def _write_json(obj: object, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2))


def _attention(
    p: str, *, hidden: int, heads: int, kv_heads: int, head_dim: int, bias: bool
) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {
        p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
        p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
        p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
    }
    if bias:
        out |= {
            p + "self_attn.q_proj.bias": (heads * head_dim,),
            p + "self_attn.k_proj.bias": (kv_heads * head_dim,),
            p + "self_attn.v_proj.bias": (kv_heads * head_dim,),
        }
    return out


def _config(model_type: str, arch: str, **fields: Any) -> dict[str, Any]:
    return {"architectures": [arch], "model_type": model_type, "torch_dtype": "bfloat16", **fields}


def llama(
    *,
    tied: bool = False,
    hidden: int = 64,
    heads: int = 8,
    kv_heads: int = 2,
    intermediate: int = 96,
    layers: int = 2,
    vocab: int = 200,
    rotary: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    model_type: str = "llama",
) -> Family:
    """A GQA Llama; untied ones also carry a rotary inv_freq buffer (float32)."""
    head_dim = hidden // heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    extra: dict[str, torch.dtype] = {}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes |= _attention(p, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim, bias=False)
        if rotary and layer == 0:
            shapes[p + "self_attn.rotary_emb.inv_freq"] = (head_dim // 2,)
            extra[p + "self_attn.rotary_emb.inv_freq"] = torch.float32
        shapes |= {
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
        }
    shapes["model.norm.weight"] = (hidden,)
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)
    config = _config(
        model_type,
        "LlamaForCausalLM" if model_type == "llama" else "MistralForCausalLM",
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        tie_word_embeddings=tied,
    )
    key = f"{model_type}-{'tied' if tied else 'untied'}"
    return Family(key, config, shapes, dtype, extra)


def qwen2(
    *,
    hidden: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 64,
    layers: int = 2,
    vocab: int = 150,
) -> Family:
    """Qwen2: q/k/v biases, untied head; 4 heads, so world size 8 is impossible."""
    head_dim = hidden // heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes |= _attention(p, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim, bias=True)
        shapes |= {
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    config = _config(
        "qwen2",
        "Qwen2ForCausalLM",
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        tie_word_embeddings=False,
    )
    return Family("qwen2", config, shapes, torch.float16)


def mixtral(
    *,
    hidden: int = 32,
    heads: int = 8,
    kv_heads: int = 2,
    intermediate: int = 48,
    experts: int = 8,
    layers: int = 2,
    vocab: int = 100,
    dtype: torch.dtype = torch.bfloat16,
) -> Family:
    """Mixtral: block_sparse_moe.experts.E.w1/w2/w3 and a router gate."""
    head_dim = hidden // heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes |= _attention(p, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim, bias=False)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "block_sparse_moe.gate.weight"] = (experts, hidden)
        for e in range(experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            shapes |= {
                q + "w1.weight": (intermediate, hidden),
                q + "w2.weight": (hidden, intermediate),
                q + "w3.weight": (intermediate, hidden),
            }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    config = _config(
        "mixtral",
        "MixtralForCausalLM",
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_local_experts=experts,
        num_experts_per_tok=2,
        vocab_size=vocab,
        tie_word_embeddings=False,
    )
    return Family("mixtral", config, shapes, dtype)


def qwen2_moe(
    *,
    hidden: int = 32,
    heads: int = 4,
    kv_heads: int = 4,
    moe_intermediate: int = 16,
    experts: int = 4,
    shared_intermediate: int = 64,
    layers: int = 2,
    vocab: int = 120,
) -> Family:
    """Qwen2-MoE: mlp.experts.E.gate/up/down_proj, mlp.gate, shared_expert and its gate."""
    head_dim = hidden // heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes |= _attention(p, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim, bias=True)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "mlp.gate.weight"] = (experts, hidden)
        for e in range(experts):
            q = f"{p}mlp.experts.{e}."
            shapes |= {
                q + "gate_proj.weight": (moe_intermediate, hidden),
                q + "up_proj.weight": (moe_intermediate, hidden),
                q + "down_proj.weight": (hidden, moe_intermediate),
            }
        shapes |= {
            p + "mlp.shared_expert.gate_proj.weight": (shared_intermediate, hidden),
            p + "mlp.shared_expert.up_proj.weight": (shared_intermediate, hidden),
            p + "mlp.shared_expert.down_proj.weight": (hidden, shared_intermediate),
            p + "mlp.shared_expert_gate.weight": (1, hidden),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    config = _config(
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_experts=experts,
        num_experts_per_tok=2,
        moe_intermediate_size=moe_intermediate,
        shared_expert_intermediate_size=shared_intermediate,
        vocab_size=vocab,
        tie_word_embeddings=False,
    )
    return Family("qwen2_moe", config, shapes, torch.float32)


def phi3(
    *,
    hidden: int = 64,
    heads: int = 8,
    kv_heads: int = 2,
    intermediate: int = 96,
    layers: int = 2,
    vocab: int = 90,
) -> Family:
    """Fused forms as Phi-3 saves them: qkv_proj = [q; k; v] and gate_up_proj = [gate; up]."""
    head_dim = hidden // heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.qkv_proj.weight": ((heads + 2 * kv_heads) * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_up_proj.weight": (2 * intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    config = _config(
        "phi3",
        "Phi3ForCausalLM",
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        tie_word_embeddings=False,
    )
    return Family("phi3", config, shapes, torch.bfloat16)


def gpt2_like(*, hidden: int = 32, layers: int = 2, vocab: int = 100, positions: int = 64) -> Family:
    """An architecture without built-in rules (GPT-2 names: wte, c_attn, c_proj, ln_1)."""
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (vocab, hidden),
        "transformer.wpe.weight": (positions, hidden),
    }
    for layer in range(layers):
        p = f"transformer.h.{layer}."
        shapes |= {
            p + "ln_1.weight": (hidden,),
            p + "ln_1.bias": (hidden,),
            p + "attn.c_attn.weight": (hidden, 3 * hidden),
            p + "attn.c_attn.bias": (3 * hidden,),
            p + "attn.c_proj.weight": (hidden, hidden),
            p + "attn.c_proj.bias": (hidden,),
            p + "ln_2.weight": (hidden,),
            p + "ln_2.bias": (hidden,),
            p + "mlp.c_fc.weight": (hidden, 4 * hidden),
            p + "mlp.c_fc.bias": (4 * hidden,),
            p + "mlp.c_proj.weight": (4 * hidden, hidden),
            p + "mlp.c_proj.bias": (hidden,),
        }
    shapes |= {"transformer.ln_f.weight": (hidden,), "transformer.ln_f.bias": (hidden,)}
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": hidden,
        "n_layer": layers,
        "n_head": 4,
        "vocab_size": vocab,
    }
    return Family("gpt2", config, shapes, torch.float32)


FAMILIES: dict[str, Family] = {
    f.key: f
    for f in (
        llama(),
        llama(tied=True, layers=3, vocab=130, dtype=torch.float32, rotary=False),
        llama(model_type="mistral", vocab=64, layers=1, rotary=False, dtype=torch.float16),
        qwen2(),
        mixtral(),
        qwen2_moe(),
        phi3(),
    )
}
"""The families sliced by the gather tests, by key."""


# ----------------------------------------------------------------- reading plans


def open_loader(model_dir: Path) -> SafetensorsLoader:
    return SafetensorsLoader(SafetensorsLoader.find_files(model_dir))


def materialise(plan: TensorPlan, sources: list[Any], chunk: int = 0) -> torch.Tensor:
    """The tensor a plan serves, read with read_range (in `chunk`-byte pieces when > 0)."""
    buf = bytearray(plan.nbytes)
    view = memoryview(buf)
    step = chunk or max(plan.nbytes, 1)
    for start in range(0, plan.nbytes, step):
        read_range(plan, sources, start, view[start : start + step])
    data = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
    return data.view(torch_dtype(plan.dtype)).reshape(plan.shape)


def rank_state(
    model_dir: Path, spec: ShardSpec, config: ModelConfig | None = None, rules: Any = None, chunk: int = 0
) -> tuple[list[TensorPlan], dict[str, torch.Tensor]]:
    """Plan one rank with plan_shard and read every tensor of it."""
    config = config if config is not None else ModelConfig.from_dir(model_dir)
    with open_loader(model_dir) as loader:
        plans = plan_shard(loader.records, spec, config, rules, loader.sharded_state)
        return plans, {p.name: materialise(p, loader.sources, chunk) for p in plans}


def raw(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The same elements as integers of the same width: cat and compare are exact on them."""
    return tensor.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and torch.equal(raw(a), raw(b))


def records_of(family: Family) -> list[TensorRecord]:
    """In-memory records of a family's tensors (one source, back to back): planning needs no file."""
    from weightserve.wire import dtype_name

    records, offset = [], 0
    for name, shape in family.shapes.items():
        dtype = family.extra_dtypes.get(name, family.dtype)
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        records.append(TensorRecord(name, dtype_name(dtype), shape, 0, offset, size))
        offset += size
    return records


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def zeros_like_bytes(tensor: torch.Tensor) -> bool:
    return not bool(np.any(raw(tensor).numpy()))
