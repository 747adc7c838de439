"""GGUF tensor names and metadata in Hugging Face terms (the Llama family).

llama.cpp names tensors `blk.N.attn_q.weight`; Hugging Face checkpoints, and so the
sharding rules and engines, call the same tensor `model.layers.N.self_attn.q_proj.weight`.
The model's shape lives in GGUF metadata (`llama.block_count`, ...) instead of a
config.json; `config_from_metadata` writes the config.json fields slicing reads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_GLOBAL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_NAME = re.compile(r"^(?:blk\.(?P<layer>\d+)\.)?(?P<base>[a-z_]+)\.(?P<kind>weight|bias)$")

PERMUTED_ARCHITECTURES = frozenset({"llama"})
"""Architectures whose attn_q / attn_k rows convert_hf_to_gguf permutes (LlamaModel.permute)."""

_ARCHITECTURE_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def hf_name(name: str) -> str:
    """The Hugging Face name of a GGUF tensor; a name outside the table is kept as it is.

    Example:
        >>> hf_name("blk.3.attn_q.weight")
        'model.layers.3.self_attn.q_proj.weight'
    """
    match = _NAME.match(name)
    if match is None:
        return name
    layer, base, kind = match["layer"], match["base"], match["kind"]
    if layer is None and base in _GLOBAL:
        return f"{_GLOBAL[base]}.{kind}"
    if layer is not None and base in _LAYER:
        return f"model.layers.{int(layer)}.{_LAYER[base]}.{kind}"
    return name


def permuted_heads(name: str, metadata: Mapping[str, Any]) -> int:
    """How many heads a GGUF tensor's rows were permuted within; 0 when they were not."""
    arch = metadata.get("general.architecture")
    match = _NAME.match(name)
    if arch not in PERMUTED_ARCHITECTURES or match is None or match["layer"] is None:
        return 0
    heads = _first(metadata.get(f"{arch}.attention.head_count"))
    if match["base"] == "attn_q":
        return heads or 0
    if match["base"] == "attn_k":
        return _first(metadata.get(f"{arch}.attention.head_count_kv")) or heads or 0
    return 0


def _first(value: Any) -> int | None:
    """A per-model integer; GGUF may store one per layer, which must then all agree."""
    if isinstance(value, list):
        return value[0] if value and all(v == value[0] for v in value) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def config_from_metadata(metadata: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any] | None:
    """A config.json-equivalent dict from GGUF metadata; None without an architecture.

    Args:
        metadata: the first file's scalar GGUF fields.
        shapes: Hugging Face name -> served shape, for the vocabulary size and tying.
    """
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        return None

    def get(key: str) -> Any:
        return metadata.get(f"{arch}.{key}")

    heads = _first(get("attention.head_count"))
    hidden = _first(get("embedding_length"))
    embed = shapes.get("model.embed_tokens.weight")
    head_dim = _first(get("attention.key_length")) or (hidden // heads if hidden and heads else None)
    config: dict[str, Any] = {
        "architectures": [_ARCHITECTURE_CLASSES[arch]] if arch in _ARCHITECTURE_CLASSES else None,
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": _first(get("feed_forward_length")),
        "num_hidden_layers": _first(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": _first(get("attention.head_count_kv")) or heads,
        "head_dim": head_dim,
        "vocab_size": _first(get("vocab_size")) or (embed[0] if embed else None),
        "max_position_embeddings": _first(get("context_length")),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "rope_theta": get("rope.freq_base"),
        "num_local_experts": _first(get("expert_count")),
        "num_experts_per_tok": _first(get("expert_used_count")),
        "tie_word_embeddings": "lm_head.weight" not in shapes,
    }
    return {key: value for key, value in config.items() if value is not None}
