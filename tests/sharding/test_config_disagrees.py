"""A config.json that disagrees with its tensors never makes a rank read another tensor's bytes.

Head counts and head_dim come from config.json, not from the tensors, and they decide
where q/k/v rows are cut. A config that lies (more k/v heads than the tensor holds, a
wrong head_dim, counts of 2^62) once cut k_proj rows out of o_proj and gate_proj, every
chunk passing its checksum. Now every plan is either refused, naming the tensor and the
config fields (DATA_LOSS), or made only of bytes of the tensor it names.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.sharding import fixtures as fx
from weightserve.client import WeightClient
from weightserve.errors import CorruptCheckpointError, FetchError, WeightserveError
from weightserve.loaders.pieces import ZEROS
from weightserve.sharding.experts import moe_layout
from weightserve.sharding.model_config import ModelConfig
from weightserve.sharding.plan import plan_shard
from weightserve.sharding.spec import ShardSpec

HEAD_FIELDS = ("num_attention_heads", "num_key_value_heads", "head_dim")


def _lie(truth: int) -> st.SearchStrategy[int]:
    """Values a broken or hostile config.json might hold in place of `truth`."""
    return st.one_of(
        st.sampled_from([truth, 0, 1, 2 * truth, truth // 2, truth + 1, 2**62]),
        st.integers(min_value=1, max_value=4096),
    )


@settings(max_examples=150, deadline=None)
@given(
    key=st.sampled_from(list(fx.FAMILIES)),
    data=st.data(),
    world_size=st.sampled_from([2, 4, 8]),
)
def test_every_plan_reads_only_its_own_tensor_or_is_refused(key: str, data: st.DataObject, world_size: int) -> None:
    family = fx.FAMILIES[key]
    truth = family.model_config
    lies = {name: data.draw(_lie(getattr(truth, name)), label=name) for name in HEAD_FIELDS}
    config = replace(truth, **lies)
    records = fx.records_of(family)
    by_name = {r.name: r for r in records}
    for rank in range(world_size):
        try:
            plans = plan_shard(records, ShardSpec("m", rank=rank, world_size=world_size), config)
        except WeightserveError:
            continue  # refused, naming why: fine
        for plan in plans:
            record = by_name[plan.name]
            for piece in plan.pieces:
                if piece.source == ZEROS:
                    continue
                last = piece.offset + (piece.rows - 1) * piece.stride + piece.row_bytes
                assert record.offset <= piece.offset and last <= record.offset + record.nbytes, (
                    f"{plan.name} (rank {rank}/{world_size}, config {lies}) reads "
                    f"[{piece.offset}, {last}) outside its own [{record.offset}, {record.offset + record.nbytes})"
                )


def test_a_config_that_agrees_still_slices_every_family() -> None:
    for family in fx.FAMILIES.values():
        records = fx.records_of(family)
        for world_size in (2,):
            for rank in range(world_size):
                plan_shard(records, ShardSpec("m", rank=rank, world_size=world_size), family.model_config)


def _with_config(model_dir: Path, **fields: Any) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | fields))


@pytest.mark.fault(
    "config.json that disagrees with its tensors",
    expect="DATA_LOSS naming the tensor and the config fields; never another tensor's bytes",
    cases=4,
)
@pytest.mark.parametrize(
    "fields",
    [
        {"num_key_value_heads": 64},
        {"head_dim": 7},
        {"num_attention_heads": 2**62, "num_key_value_heads": 2**62},
        {"num_attention_heads": 6},
    ],
    ids=["more-kv-heads", "wrong-head-dim", "huge-heads", "heads-not-dividing-q"],
)
def test_a_served_model_whose_config_lies_is_data_loss_at_every_rank(
    serve: Any, tmp_path: Path, fields: dict[str, int]
) -> None:
    root = tmp_path / "models"
    family = fx.FAMILIES["llama-untied"]
    family.write(root / "org/liar")
    _with_config(root / "org/liar", **fields)
    server = serve(root)
    with WeightClient(server.address) as client:
        for world_size in (2, 4):
            for rank in range(world_size):
                with pytest.raises(FetchError) as refused:
                    client.fetch_state_dict("org/liar", rank=rank, world_size=world_size)
                assert refused.value.code() in (grpc.StatusCode.DATA_LOSS, grpc.StatusCode.INVALID_ARGUMENT)
                assert "config.json" in str(refused.value) or "num_attention_heads" in str(refused.value)
        whole = client.fetch_state_dict("org/liar")  # unsliced, the config is not used
    assert all(fx.same_bytes(whole[name], tensor) for name, tensor in family.tensors().items())


def test_model_config_reads_what_the_tests_lie_about() -> None:
    assert ModelConfig.from_dict({"num_attention_heads": 4, "head_dim": 8}).num_key_value_heads == 4
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        assert ModelConfig.from_dict({key: 8}).num_experts == 8


def _without(family: fx.Family, dropped: str) -> fx.Family:
    return replace(family, shapes={n: s for n, s in family.shapes.items() if not re.search(dropped, n)})


@pytest.mark.fault(
    "config.json that disagrees with its tensors",
    expect="DATA_LOSS naming the tensor and the config fields; never another tensor's bytes",
    cases=4,
)
@pytest.mark.parametrize(
    ("dropped", "expected", "why"),
    [
        (r"experts\.3\.", 0, r"lacks expert\(s\) \[3\]"),  # expert 4 would be served as 3
        (r"layers\.1\..*experts\.5\.w2", 0, "expert 5 has weights"),
        (r"experts\.7\.", 8, "config.json says 8"),  # 0..6 are contiguous: only the config tells
        ("^$", 16, "config.json says 16"),
    ],
    ids=["missing-middle-expert", "expert-missing-a-weight", "missing-last-expert", "config-counts-more"],
)
def test_experts_that_are_not_0_to_e_minus_1_with_the_same_weights_are_data_loss(
    dropped: str, expected: int, why: str
) -> None:
    family = _without(fx.FAMILIES["mixtral"], dropped)
    records = fx.records_of(family)
    with pytest.raises(CorruptCheckpointError, match=why):
        moe_layout(records, expected)
    config = replace(family.model_config, num_experts=expected)
    with pytest.raises(CorruptCheckpointError):  # the layout is checked before any slot is placed
        plan_shard(records, ShardSpec("m", ep_size=2, ep_rank=0), config)


def test_a_served_moe_model_missing_an_expert_is_data_loss_for_expert_parallel_ranks(
    serve: Any, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    family = _without(fx.FAMILIES["mixtral"], r"experts\.3\.")
    family.write(root / "org/gappy")
    server = serve(root)
    with WeightClient(server.address) as client, pytest.raises(FetchError) as refused:
        client.get_manifest("org/gappy", ep_size=2, ep_rank=0)
    assert refused.value.code() == grpc.StatusCode.DATA_LOSS, refused.value
    assert "lacks expert(s) [3]" in str(refused.value)
