"""A config.json that disagrees with its tensors never makes a rank read another tensor's bytes.

Head counts and head_dim come from config.json, not from the tensors, and they decide
where q/k/v rows are cut. A config that lies (more k/v heads than the tensor holds, a
wrong head_dim, counts of 2^62) once cut k_proj rows out of o_proj and gate_proj, every
chunk passing its checksum. Now every plan is either refused, naming the tensor and the
config fields (DATA_LOSS), or made only of bytes of the tensor it names.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.sharding import fixtures as fx
from weightserve.client import WeightClient
from weightserve.errors import FetchError, WeightserveError
from weightserve.loaders.pieces import ZEROS
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
