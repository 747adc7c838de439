"""Which way each tensor splits, decided from its name alone.

Known families (Llama, Mistral, Qwen2/3, Mixtral, Qwen-MoE, Phi-3's fused forms) use
the built-in table; an operator can put a rules file (TOML) in front of it, and for
an unknown architecture the operator's rules are the only rules. A tensor no rule
matches is an error that names it: a wrong guess would serve wrong weights silently.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from weightserve.errors import InvalidRequestError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

KINDS = ("replicated", "dim", "vocab", "q", "kv", "qkv", "halves")


@dataclass(frozen=True)
class Rule:
    """How one tensor splits.

    kind:
        replicated: every rank gets it whole.
        dim: an even split along `dim` (0 = column-parallel, 1 = row-parallel).
        vocab: rows padded with zeros to a multiple of 64, then split on dim 0.
        q / kv: attention projections split by heads (kv heads replicate when
            world_size exceeds them).
        qkv: a fused q/k/v projection, each part split by heads and concatenated.
        halves: a fused gate/up projection split per half along `dim`.
    """

    kind: str
    dim: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"rule kind {self.kind!r} is not one of {KINDS}")


KNOWN_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "phi3"})

BUILTIN_RULES: tuple[tuple[re.Pattern[str], Rule], ...] = tuple(
    (re.compile(pattern), rule)
    for pattern, rule in (
        (r"(?:^|\.)(?:embed_tokens|lm_head)\.weight$", Rule("vocab")),
        (r"\.q_proj\.(?:weight|bias)$", Rule("q")),
        (r"\.[kv]_proj\.(?:weight|bias)$", Rule("kv")),
        (r"\.qkv_proj\.(?:weight|bias)$", Rule("qkv")),
        (r"\.gate_up_proj\.weight$", Rule("halves", 0)),
        (r"\.experts\.w13_weight$", Rule("halves", 1)),
        (r"\.experts\.w2_weight$", Rule("dim", 2)),
        (r"\.(?:gate_proj|up_proj|w1|w3)\.(?:weight|bias)$", Rule("dim", 0)),
        (r"\.(?:o_proj|down_proj|w2)\.weight$", Rule("dim", 1)),
        (r"\.(?:o_proj|down_proj|w2)\.bias$", Rule("replicated")),
        (r"norm\.(?:weight|bias)$", Rule("replicated")),
        (r"\.(?:gate|router)\.(?:weight|e_score_correction_bias)$", Rule("replicated")),
        (r"\.shared_expert_gate\.weight$", Rule("replicated")),
        (r"rotary_emb\.inv_freq$", Rule("replicated")),
    )
)


@dataclass(frozen=True)
class RuleSet:
    """Operator rules first, then the built-in table for known families."""

    operator: tuple[tuple[re.Pattern[str], Rule], ...] = ()

    def rule_for(self, name: str, model_type: str) -> Rule:
        """The first matching rule.

        Raises:
            InvalidRequestError: nothing matches (names the tensor and the family).
        """
        table = self.operator + (BUILTIN_RULES if model_type in KNOWN_FAMILIES else ())
        for pattern, rule in table:
            if pattern.search(name):
                return rule
        if model_type not in KNOWN_FAMILIES and not self.operator:
            raise InvalidRequestError(
                f"architecture {model_type or '(no model_type in config.json)'!r} has no built-in sharding "
                f"rules (have {sorted(KNOWN_FAMILIES)}); give the server a rules file (--sharding-rules)"
            )
        raise InvalidRequestError(f"no sharding rule places tensor {name!r} ({model_type or 'unknown'} family)")


def load_rules(path: Path) -> RuleSet:
    """Read operator rules from TOML.

    Each `[[rules]]` entry has `pattern` (a regex searched in the tensor name) and one
    of `dim = N`, `replicated = true` or `vocab = true`::

        [[rules]]
        pattern = "\\\\.attn\\\\.c_attn\\\\.weight$"
        dim = 0
    """
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"sharding rules {path}: {e}") from None
    rules = []
    for i, entry in enumerate(raw.get("rules", [])):
        try:
            pattern = re.compile(entry["pattern"])
        except (KeyError, re.error, TypeError) as e:
            raise ValueError(f"sharding rules {path}: rule {i} needs a valid 'pattern' ({e})") from None
        kinds = [key for key in ("dim", "replicated", "vocab") if key in entry]
        dim = entry.get("dim")
        if kinds == ["replicated"] and entry["replicated"] is True:
            rule = Rule("replicated")
        elif kinds == ["vocab"] and entry["vocab"] is True:
            rule = Rule("vocab")
        elif kinds == ["dim"] and type(dim) is int and dim >= 0:  # bool is an int: refuse dim = true
            rule = Rule("dim", dim)
        else:
            raise ValueError(
                f"sharding rules {path}: rule {i} needs exactly one of dim = N, replicated = true or vocab = true"
            )
        rules.append((pattern, rule))
    return RuleSet(tuple(rules))
