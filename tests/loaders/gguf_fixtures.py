"""Tiny Llama GGUF files written with the gguf package's own writer, and what they must serve.

Weights start as Hugging Face float32 tensors. q/k are permuted with convert_hf_to_gguf's
own formula before they are encoded, as the converter does; every other tensor is
encoded as it is. The served bytes of a tensor must then equal the encoding of the
Hugging Face tensor: permuting rows commutes with row-wise quantization.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf.quants import quantize

from weightserve.testing import LlamaShape, llama_tensor_shapes

SHAPE = LlamaShape(
    hidden_size=64, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=96,
)  # fmt: skip
"""In-dims of 64 are two Q8_0/Q4_0 blocks; ffn_down's 512 is two Q4_K blocks."""

TYPES = {
    "token_embd": T.F16, "output_norm": T.F32, "output": T.Q8_0, "attn_v": T.BF16, "attn_output": T.Q8_0,
    "ffn_gate": T.Q4_0, "ffn_up": T.F16, "ffn_down": T.Q4_K, "attn_norm": T.F32, "ffn_norm": T.F32,
}  # fmt: skip
LAYER_TYPES = {0: {"attn_q": T.Q8_0, "attn_k": T.F32}, 1: {"attn_q": T.F32, "attn_k": T.Q4_0}}
"""q and k are permuted; each is written once as floats and once quantized."""

GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}  # fmt: skip


def reference_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf.LlamaModel.permute, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")  # model.layers.N.(self_attn|mlp).X.weight or model.layers.N.X.weight
    return f"blk.{parts[2]}.{GGUF_NAMES[parts[-2]]}.{parts[-1]}"


def encode(w: np.ndarray, qtype: T) -> np.ndarray:
    """What the GGUF file holds for float32 `w` in `qtype` (K-quants: raw blocks)."""
    if qtype == T.F32:
        return w.astype(np.float32)
    if qtype == T.F16:
        return w.astype(np.float16)
    if qtype == T.Q4_K:  # the package cannot quantize K-quants: finite scales, seeded quants
        blocks = np.random.default_rng(w.size).integers(0, 256, (w.shape[0], w.shape[1] // 256, 144), np.uint8)
        blocks[..., 0:4] = np.array([0.01, 0.001], dtype=np.float16).view(np.uint8)
        return blocks.reshape(w.shape[0], -1)
    return quantize(w, qtype)


@dataclass
class Written:
    """A written GGUF model: its files, and per Hugging Face name what must be served."""

    files: list[Path]
    hf: dict[str, np.ndarray] = field(default_factory=dict)
    types: dict[str, T] = field(default_factory=dict)
    expected: dict[str, tuple[str, tuple[int, ...], bytes]] = field(default_factory=dict)


def _type_of(hf: str) -> T:
    base = GGUF_NAMES.get(hf.split(".")[-2], "") if hf.startswith("model.layers.") else gguf_name(hf).split(".")[0]
    if base in ("attn_q", "attn_k"):
        return LAYER_TYPES[int(hf.split(".")[2])][base]
    return TYPES[base]


def write_llama_gguf(model_dir: Path, split_max_tensors: int = 0, tie: bool = False, seed: int = 0) -> Written:
    """Write SHAPE as GGUF (split into parts of `split_max_tensors` when given), atomically."""
    shape = LlamaShape(**{**SHAPE.__dict__, "tie_word_embeddings": tie})
    rng = np.random.default_rng(seed)
    staging = model_dir / ".staging"
    staging.mkdir(parents=True)
    writer = GGUFWriter(staging / "model.gguf", "llama", split_max_tensors=split_max_tensors)
    writer.add_block_count(shape.num_hidden_layers)
    writer.add_context_length(2048)
    writer.add_embedding_length(shape.hidden_size)
    writer.add_feed_forward_length(shape.intermediate_size)
    writer.add_head_count(shape.num_attention_heads)
    writer.add_head_count_kv(shape.num_key_value_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    written = Written([])
    for hf, size in llama_tensor_shapes(shape).items():
        w = (rng.standard_normal(size) * 0.02).astype(np.float32)
        qtype = _type_of(hf)
        stored = w
        if hf.endswith("q_proj.weight"):
            stored = reference_permute(w, shape.num_attention_heads, shape.num_attention_heads)
        elif hf.endswith("k_proj.weight"):
            stored = reference_permute(w, shape.num_attention_heads, shape.num_key_value_heads)
        data = encode(stored, qtype)
        raw = qtype not in (T.F32, T.F16)
        writer.add_tensor(gguf_name(hf), data, raw_dtype=qtype if raw else None)
        served = encode(w, qtype)
        if qtype == T.Q4_K:
            served = data  # raw blocks are their own reference (ffn_down is never permuted)
        dtype = {T.F32: "F32", T.F16: "F16", T.BF16: "BF16"}.get(qtype, "U8")
        served_shape = w.shape if dtype != "U8" else served.shape
        written.hf[hf], written.types[hf] = w, qtype
        written.expected[hf] = (dtype, tuple(served_shape), served.tobytes())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for path in sorted(staging.iterdir()):
        os.replace(path, model_dir / path.name)
        written.files.append(model_dir / path.name)
    shutil.rmtree(staging)
    return written
