"""Which way each tensor splits: the built-in table by name, and operator TOML rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.sharding import fixtures as fx
from weightserve.errors import InvalidRequestError
from weightserve.sharding.model_config import ModelConfig
from weightserve.sharding.plan import plan_shard
from weightserve.sharding.rules import KNOWN_FAMILIES, Rule, RuleSet, load_rules
from weightserve.sharding.spec import ShardSpec

VOCAB, Q, KV, QKV = Rule("vocab"), Rule("q"), Rule("kv"), Rule("qkv")
COLUMN, ROW, REPLICATED = Rule("dim", 0), Rule("dim", 1), Rule("replicated")

CLASSIFICATION: list[tuple[str, str, Rule]] = [
    # Llama / Mistral: vocabulary-parallel ends, heads, column/row MLP, replicated norms
    ("llama", "model.embed_tokens.weight", VOCAB),
    ("llama", "lm_head.weight", VOCAB),
    ("llama", "model.layers.0.self_attn.q_proj.weight", Q),
    ("llama", "model.layers.0.self_attn.k_proj.weight", KV),
    ("llama", "model.layers.0.self_attn.v_proj.weight", KV),
    ("llama", "model.layers.0.self_attn.o_proj.weight", ROW),
    ("llama", "model.layers.0.mlp.gate_proj.weight", COLUMN),
    ("llama", "model.layers.0.mlp.up_proj.weight", COLUMN),
    ("llama", "model.layers.0.mlp.down_proj.weight", ROW),
    ("llama", "model.layers.0.input_layernorm.weight", REPLICATED),
    ("llama", "model.layers.0.post_attention_layernorm.weight", REPLICATED),
    ("llama", "model.norm.weight", REPLICATED),
    ("llama", "model.layers.0.self_attn.rotary_emb.inv_freq", REPLICATED),
    ("llama", "model.layers.11.self_attn.o_proj.bias", REPLICATED),
    ("llama", "model.layers.11.mlp.down_proj.bias", REPLICATED),
    ("llama", "model.layers.11.mlp.gate_proj.bias", COLUMN),
    ("llama", "model.layers.11.mlp.up_proj.bias", COLUMN),
    ("mistral", "model.layers.3.self_attn.k_proj.weight", KV),
    ("mistral", "model.layers.3.mlp.down_proj.weight", ROW),
    ("mistral", "lm_head.weight", VOCAB),
    # Qwen2 / Qwen3: q/k/v biases follow their weights; Qwen3's q/k norms are replicated
    ("qwen2", "model.layers.0.self_attn.q_proj.bias", Q),
    ("qwen2", "model.layers.0.self_attn.k_proj.bias", KV),
    ("qwen2", "model.layers.0.self_attn.v_proj.bias", KV),
    ("qwen2", "model.layers.0.self_attn.o_proj.weight", ROW),
    ("qwen3", "model.layers.0.self_attn.q_norm.weight", REPLICATED),
    ("qwen3", "model.layers.0.self_attn.k_norm.weight", REPLICATED),
    ("qwen3", "model.layers.0.self_attn.q_proj.weight", Q),
    # Mixtral: experts w1/w3 column, w2 row, router gate replicated
    ("mixtral", "model.layers.0.block_sparse_moe.gate.weight", REPLICATED),
    ("mixtral", "model.layers.0.block_sparse_moe.experts.0.w1.weight", COLUMN),
    ("mixtral", "model.layers.0.block_sparse_moe.experts.7.w3.weight", COLUMN),
    ("mixtral", "model.layers.0.block_sparse_moe.experts.7.w2.weight", ROW),
    ("mixtral", "model.layers.1.self_attn.v_proj.weight", KV),
    # Qwen-MoE: experts gate/up column, down row; router and shared-expert gate replicated
    ("qwen2_moe", "model.layers.0.mlp.gate.weight", REPLICATED),
    ("qwen2_moe", "model.layers.0.mlp.experts.59.gate_proj.weight", COLUMN),
    ("qwen2_moe", "model.layers.0.mlp.experts.59.up_proj.weight", COLUMN),
    ("qwen2_moe", "model.layers.0.mlp.experts.59.down_proj.weight", ROW),
    ("qwen2_moe", "model.layers.0.mlp.shared_expert.gate_proj.weight", COLUMN),
    ("qwen2_moe", "model.layers.0.mlp.shared_expert.up_proj.weight", COLUMN),
    ("qwen2_moe", "model.layers.0.mlp.shared_expert.down_proj.weight", ROW),
    ("qwen2_moe", "model.layers.0.mlp.shared_expert_gate.weight", REPLICATED),
    ("qwen3_moe", "model.layers.0.mlp.experts.0.down_proj.weight", ROW),
    ("qwen3_moe", "model.layers.0.mlp.gate.weight", REPLICATED),
    # Phi-3: fused forms, split per part
    ("phi3", "model.layers.0.self_attn.qkv_proj.weight", QKV),
    ("phi3", "model.layers.0.mlp.gate_up_proj.weight", Rule("halves", 0)),
    ("phi3", "model.layers.0.self_attn.o_proj.weight", ROW),
    ("phi3", "model.layers.0.mlp.down_proj.weight", ROW),
    ("phi3", "model.embed_tokens.weight", VOCAB),
    # experts already stacked as vLLM holds them: [E, 2I, H] per half on dim 1, [E, H, I] on dim 2
    ("mixtral", "model.layers.0.block_sparse_moe.experts.w13_weight", Rule("halves", 1)),
    ("mixtral", "model.layers.0.block_sparse_moe.experts.w2_weight", Rule("dim", 2)),
]


@pytest.mark.parametrize(
    ("model_type", "name", "rule"), CLASSIFICATION, ids=[c[1] + "@" + c[0] for c in CLASSIFICATION]
)
def test_builtin_table_classifies_each_family(model_type: str, name: str, rule: Rule) -> None:
    assert RuleSet().rule_for(name, model_type) == rule


def test_every_family_of_the_spec_is_known() -> None:
    assert {"llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "phi3"} <= KNOWN_FAMILIES


@pytest.mark.parametrize("key", list(fx.FAMILIES))
def test_every_fixture_tensor_has_a_rule(key: str) -> None:
    family = fx.FAMILIES[key]
    rules = RuleSet()
    for name in family.shapes:
        rules.rule_for(name, family.model_config.model_type)


def test_unmatched_tensor_in_a_known_family_is_named() -> None:
    with pytest.raises(InvalidRequestError, match=r"model\.layers\.0\.mlp\.fancy_proj\.weight") as err:
        RuleSet().rule_for("model.layers.0.mlp.fancy_proj.weight", "llama")
    assert "llama" in str(err.value)


def test_plan_names_the_first_tensor_it_cannot_place() -> None:
    family = fx.llama()
    records = fx.records_of(family)
    extra = fx.records_of(
        fx.Family(
            "x",
            {},
            {"model.layers.0.mlp.alpha.weight": (4, 4), "model.layers.1.mlp.beta.weight": (4, 4)},
            torch.float32,
        )
    )
    end = records[-1].offset + records[-1].nbytes
    records += [type(r)(r.name, r.dtype, r.shape, 0, end + r.offset, r.nbytes) for r in extra]
    with pytest.raises(InvalidRequestError, match=r"alpha") as err:
        plan_shard(records, ShardSpec("m", rank=0, world_size=2), family.model_config)
    assert "beta" not in str(err.value)


def test_unknown_architecture_without_rules_names_the_architecture() -> None:
    gpt2 = fx.gpt2_like()
    with pytest.raises(InvalidRequestError, match=r"'gpt2'.*rules"):
        plan_shard(fx.records_of(gpt2), ShardSpec("m", rank=0, world_size=2), gpt2.model_config)
    with pytest.raises(InvalidRequestError, match=r"no model_type"):
        RuleSet().rule_for("model.embed_tokens.weight", "")


def test_unknown_architecture_is_served_as_saved_at_world_size_one() -> None:
    gpt2 = fx.gpt2_like()
    plans = plan_shard(fx.records_of(gpt2), ShardSpec("m"), gpt2.model_config)
    assert {p.name: p.shape for p in plans} == gpt2.shapes


GPT2_RULES = r"""
# GPT-2 keeps Conv1D weights as [in, out]: column-parallel is dim 1, row-parallel dim 0.
[[rules]]
pattern = '(?:^|\.)wte\.weight$'
vocab = true

[[rules]]
pattern = '\.(?:c_attn|c_fc)\.weight$'
dim = 1

[[rules]]
pattern = '\.(?:c_attn|c_fc)\.bias$'
dim = 0

[[rules]]
pattern = '\.c_proj\.weight$'
dim = 0

[[rules]]
pattern = '(?:\.c_proj\.bias|ln_\w+\.(?:weight|bias)|wpe\.weight)$'
replicated = true
"""


def test_operator_rules_place_an_unknown_architecture(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.toml"
    path.write_text(GPT2_RULES)
    rules = load_rules(path)
    gpt2 = fx.gpt2_like()  # hidden 32, vocab 100, 64 positions
    model_dir = tmp_path / "gpt2"
    originals = gpt2.write(model_dir)
    expected_shapes = {
        "transformer.wte.weight": (64, 32),  # 100 rows padded to 128, half each
        "transformer.wpe.weight": (64, 32),
        "transformer.h.0.ln_1.weight": (32,),
        "transformer.h.0.attn.c_attn.weight": (32, 48),
        "transformer.h.0.attn.c_attn.bias": (48,),
        "transformer.h.0.attn.c_proj.weight": (16, 32),
        "transformer.h.0.attn.c_proj.bias": (32,),
        "transformer.h.0.mlp.c_fc.weight": (32, 64),
        "transformer.h.0.mlp.c_fc.bias": (64,),
        "transformer.h.0.mlp.c_proj.weight": (64, 32),
        "transformer.ln_f.bias": (32,),
    }
    for rank in range(2):
        _, state = fx.rank_state(model_dir, ShardSpec("m", rank=rank, world_size=2), rules=rules)
        assert set(state) == set(originals)
        for name, shape in expected_shapes.items():
            assert tuple(state[name].shape) == shape, name
        c_attn = originals["transformer.h.1.attn.c_attn.weight"]
        assert fx.same_bytes(state["transformer.h.1.attn.c_attn.weight"], c_attn[:, rank * 48 : (rank + 1) * 48])
        c_proj = originals["transformer.h.1.mlp.c_proj.weight"]
        assert fx.same_bytes(state["transformer.h.1.mlp.c_proj.weight"], c_proj[rank * 64 : (rank + 1) * 64])
        assert fx.same_bytes(state["transformer.ln_f.weight"], originals["transformer.ln_f.weight"])
        wte = originals["transformer.wte.weight"]
        if rank == 0:
            assert fx.same_bytes(state["transformer.wte.weight"], wte[:64])
        else:
            assert fx.same_bytes(state["transformer.wte.weight"][:36], wte[64:])
            assert fx.zeros_like_bytes(state["transformer.wte.weight"][36:])


def test_operator_rules_miss_names_the_tensor(tmp_path: Path) -> None:
    path = tmp_path / "partial.toml"
    path.write_text("[[rules]]\npattern = 'wte'\nvocab = true\n")
    gpt2 = fx.gpt2_like()
    with pytest.raises(InvalidRequestError, match=r"transformer\.wpe\.weight"):
        plan_shard(fx.records_of(gpt2), ShardSpec("m", rank=0, world_size=2), gpt2.model_config, load_rules(path))


def test_operator_rules_come_before_the_builtin_table(tmp_path: Path) -> None:
    path = tmp_path / "override.toml"
    path.write_text("[[rules]]\npattern = '^lm_head\\.weight$'\nreplicated = true\n")
    rules = load_rules(path)
    assert rules.rule_for("lm_head.weight", "llama") == REPLICATED
    assert rules.rule_for("model.embed_tokens.weight", "llama") == VOCAB


def test_operator_dim_past_the_tensor_rank_is_invalid(tmp_path: Path) -> None:
    path = tmp_path / "deep.toml"
    path.write_text("[[rules]]\npattern = '.'\ndim = 3\n")
    gpt2 = fx.gpt2_like()
    with pytest.raises(InvalidRequestError, match=r"transformer\.wte\.weight.*dim 3"):
        plan_shard(fx.records_of(gpt2), ShardSpec("m", rank=0, world_size=2), gpt2.model_config, load_rules(path))


@pytest.mark.parametrize(
    "text",
    [
        "[[rules]\npattern = 'x'",  # not TOML
        "[[rules]]\ndim = 0\n",  # no pattern
        "[[rules]]\npattern = '('\ndim = 0\n",  # bad regex
        "[[rules]]\npattern = 5\ndim = 0\n",  # pattern not a string
        "[[rules]]\npattern = 'x'\n",  # no kind
        "[[rules]]\npattern = 'x'\ndims = 0\n",  # misspelt kind
        "[[rules]]\npattern = 'x'\ndim = -1\n",
        "[[rules]]\npattern = 'x'\ndim = '0'\n",
        "[[rules]]\npattern = 'x'\ndim = 1.5\n",
        "[[rules]]\npattern = 'x'\nreplicated = false\n",
        "rules = 'x'\n",
        "rules = [1]\n",
        # a TOML boolean is not a dimension (Python's bool is an int: true would mean dim 1)
        "[[rules]]\npattern = 'x'\ndim = true\n",
        # a rule is one of dim, replicated or vocab, not two of them
        "[[rules]]\npattern = 'x'\ndim = 0\nreplicated = true\n",
    ],
    ids=[
        "not-toml",
        "no-pattern",
        "bad-regex",
        "pattern-not-string",
        "no-kind",
        "misspelt-kind",
        "negative-dim",
        "string-dim",
        "float-dim",
        "replicated-false",
        "rules-not-array",
        "rule-not-table",
        "boolean-dim",
        "two-kinds",
    ],
)
def test_malformed_rules_are_value_errors(tmp_path: Path, text: str) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match="rules"):
        load_rules(path)


def test_missing_rules_file_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"nope\.toml"):
        load_rules(tmp_path / "nope.toml")


def test_unknown_rule_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="sideways"):
        Rule("sideways")


def test_config_reads_heads_and_head_dim() -> None:
    cfg = ModelConfig.from_dict(fx.mixtral().config)
    assert (cfg.model_type, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (
        "mixtral",
        8,
        2,
        4,
    )
    derived = ModelConfig.from_dict({"model_type": "qwen2", "hidden_size": 32, "num_attention_heads": 4})
    assert (derived.head_dim, derived.num_key_value_heads) == (8, 4)
