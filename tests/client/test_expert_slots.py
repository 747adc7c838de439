"""The client refuses an expert-parallel manifest whose tensors and placement disagree."""

from __future__ import annotations

import grpc
import pytest

from weightserve.client.expert_slots import check_expert_slots
from weightserve.errors import FetchError
from weightserve.v1 import weightserve_pb2 as pb


def manifest(names: list[str], sent: dict[int, list[int]], shapes: dict[str, list[int]] | None = None):  # type: ignore[no-untyped-def]
    tensors = [pb.TensorInfo(name=n, dtype="F32", shape=(shapes or {}).get(n, [2]), nbytes=8) for n in names]
    layers = [pb.LayerSlots(layer=layer, sent_slots=slots) for layer, slots in sent.items()]
    return pb.GetManifestResponse(
        manifest_id="m1", tensors=tensors, experts=pb.ExpertPlacement(mapping_version=7, layers=layers)
    )


def expert(layer: int, slot: int, part: str = "w1") -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{slot}.{part}.weight"


def test_tensors_matching_the_sent_slots_pass() -> None:
    names = ["model.embed_tokens.weight", expert(0, 0), expert(0, 1), expert(0, 1, "w2"), expert(1, 1)]
    check_expert_slots(manifest(names, {0: [0, 1], 1: [1]}), "m")
    check_expert_slots(manifest([], {0: [], 1: []}), "m")  # a delta that moves nothing
    check_expert_slots(pb.GetManifestResponse(manifest_id="dense"), "m")  # no expert parallelism


@pytest.mark.fault("manifest whose expert tensors and placement disagree")
@pytest.mark.parametrize(
    ("names", "sent", "why"),
    [
        ([expert(0, 0), expert(0, 1)], {0: [0]}, r"layer 0 has tensors for slots \[0, 1\], the placement sends \[0\]"),
        ([expert(0, 0)], {0: [0, 1]}, r"layer 0 has tensors for slots \[0\], the placement sends \[0, 1\]"),
        ([expert(0, 0), expert(1, 0)], {0: [0]}, r"layer 1 has tensors for slots \[0\], the placement sends \[\]"),
    ],
)
def test_disagreeing_slots_are_data_loss(names: list[str], sent: dict[int, list[int]], why: str) -> None:
    with pytest.raises(FetchError, match=why) as info:
        check_expert_slots(manifest(names, sent), "org/moe")
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    assert "mapping v7" in str(info.value)


@pytest.mark.fault("manifest whose expert tensors and placement disagree")
def test_stacked_vllm_tensors_are_counted_by_their_first_dim() -> None:
    w13 = "model.layers.3.block_sparse_moe.experts.w13_weight"
    check_expert_slots(manifest([w13], {3: [0, 1]}, {w13: [2, 8, 4]}), "m")
    with pytest.raises(FetchError, match="layer 3 stacks 3 slots"):
        check_expert_slots(manifest([w13], {3: [0, 1]}, {w13: [3, 8, 4]}), "m")
