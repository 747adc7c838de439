"""The few config.json fields that slicing depends on."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightserve.errors import CorruptCheckpointError
from weightserve.loaders.access import read_text


@dataclass(frozen=True)
class ModelConfig:
    """Head counts and sizes that decide how tensors split; zero means unknown."""

    model_type: str = ""
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    hidden_size: int = 0
    vocab_size: int = 0
    num_hidden_layers: int = 0
    tie_word_embeddings: bool = False
    n_group: int = 0
    """Expert groups of group-limited routing (DeepSeek-V3 style); 0: none named."""
    topk_group: int = 0
    """Groups each token is routed to; 0: none named. Read for EPLB's dispatch estimate only."""
    num_experts: int = 0
    """Routed experts per MoE layer (num_local_experts, num_experts or n_routed_experts); 0: not named."""

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face config dict (nested text_config is used when present)."""
        cfg = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
        assert isinstance(cfg, dict)
        heads = _int(cfg, "num_attention_heads")
        hidden = _int(cfg, "hidden_size")
        head_dim = _int(cfg, "head_dim") or (hidden // heads if heads else 0)
        return cls(
            model_type=str(cfg.get("model_type") or raw.get("model_type") or ""),
            num_attention_heads=heads,
            num_key_value_heads=_int(cfg, "num_key_value_heads") or heads,
            head_dim=head_dim,
            hidden_size=hidden,
            vocab_size=_int(cfg, "vocab_size"),
            num_hidden_layers=_int(cfg, "num_hidden_layers"),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
            n_group=_hint(cfg, "n_group"),
            topk_group=_hint(cfg, "topk_group"),
            num_experts=next(
                (n for key in ("num_local_experts", "num_experts", "n_routed_experts") if (n := _hint(cfg, key))), 0
            ),
        )

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelConfig:
        """The model's config.json, or an empty config when it has none.

        Messages name the file by its base name only: they reach clients.

        Raises:
            CorruptCheckpointError: it cannot be read, or is no JSON object.
            PreconditionError: the server may not read it.
        """
        path = model_dir / "config.json"
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(read_text(path))
        except OSError as e:  # its strerror only: str(e) holds the server's full path
            raise CorruptCheckpointError(f"{path.name}: cannot read it ({e.strerror})") from None
        except (ValueError, RecursionError) as e:
            raise CorruptCheckpointError(f"{path.name}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise CorruptCheckpointError(f"{path.name}: not a JSON object")
        return cls.from_dict(raw)


def _hint(cfg: dict[str, Any], key: str) -> int:
    """A positive integer field that only estimates use: anything else reads as 0, never an error."""
    value = cfg.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _int(cfg: dict[str, Any], key: str) -> int:
    value = cfg.get(key)
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CorruptCheckpointError(f"config.json: {key} = {value!r} is not a non-negative integer")
    return value
