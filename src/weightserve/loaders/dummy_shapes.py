"""Tensor names, shapes and dtype of a checkpoint, from its config.json alone.

Covers the families dummy weights are served for: Llama, Mistral, Qwen2 (q/k/v
biases) and Mixtral (sparse MoE experts). Names and order are Hugging Face's, as
weightserve.testing.llama_tensor_shapes gives them for Llama.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

FAMILIES = ("llama", "mistral", "qwen2", "mixtral")

TORCH_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
"""config.json's torch_dtype -> wire dtype; BF16 when the config names none."""


def _field(config: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if value is None:
        raise ValueError(f"config.json has no {key}, which dummy weights need")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"config.json: {key} = {value!r} is not a positive integer")
    return value


def config_dtype(config: Mapping[str, Any]) -> str:
    """The wire dtype of the weights (config.json's torch_dtype, or dtype)."""
    name = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    if name not in TORCH_DTYPES:
        raise ValueError(f"config.json: torch_dtype {name!r} is not one of {sorted(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def tensor_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Hugging Face names and shapes of every weight, in layer order.

    Raises:
        ValueError: an unsupported family, or a field missing or not a positive integer.
    """
    family = config.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"dummy weights cover model_type {list(FAMILIES)}, not {family!r}")
    h = _field(config, "hidden_size")
    heads = _field(config, "num_attention_heads")
    kv_heads = _field(config, "num_key_value_heads", heads)
    head_dim = _field(config, "head_dim", h // heads)
    inter = _field(config, "intermediate_size")
    vocab = _field(config, "vocab_size")
    q, kv = heads * head_dim, kv_heads * head_dim
    biases = family == "qwen2" or bool(config.get("attention_bias"))
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for layer in range(_field(config, "num_hidden_layers")):
        p = f"model.layers.{layer}."
        out[p + "input_layernorm.weight"] = (h,)
        for part, rows in (("q", q), ("k", kv), ("v", kv)):
            out[f"{p}self_attn.{part}_proj.weight"] = (rows, h)
            if biases:
                out[f"{p}self_attn.{part}_proj.bias"] = (rows,)
        out[p + "self_attn.o_proj.weight"] = (h, q)
        if biases and family != "qwen2":
            out[p + "self_attn.o_proj.bias"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        if family == "mixtral":
            experts = _field(config, "num_local_experts")
            out[p + "block_sparse_moe.gate.weight"] = (experts, h)
            for e in range(experts):
                ep = f"{p}block_sparse_moe.experts.{e}."
                out |= {
                    ep + "w1.weight": (inter, h),
                    ep + "w2.weight": (h, inter),
                    ep + "w3.weight": (inter, h),
                }
        else:
            out |= {p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h)}
            out[p + "mlp.down_proj.weight"] = (h, inter)
    out["model.norm.weight"] = (h,)
    if not config.get("tie_word_embeddings", False):
        out["lm_head.weight"] = (vocab, h)
    return out
