"""A grant's placements read as runs: the same runs from a server's runs and from per-tensor placements,
and every way a grant can disagree with its manifest refused as DATA_LOSS before anything is mapped."""

from __future__ import annotations

import grpc
import pytest
import torch

from weightserve.client.placements import Run, manifest_names, names_of, runs_of
from weightserve.errors import FetchError
from weightserve.v1 import weightserve_pb2 as pb

BF16 = ("BF16", [4, 8], 64)
F32 = ("F32", [16], 64)
I8 = ("I8", [7], 7)


def manifest(*kinds: tuple[str, list[int], int]) -> pb.GetManifestResponse:
    infos = [pb.TensorInfo(name=f"t.{n}", dtype=d, shape=s, nbytes=b) for n, (d, s, b) in enumerate(kinds)]
    return pb.GetManifestResponse(tensors=infos, total_bytes=sum(i.nbytes for i in infos))


def placements(plan: pb.GetManifestResponse, segment_of: list[int] | None = None) -> list[pb.TensorPlacement]:
    """Each tensor right after the last in its segment (segment 0 unless `segment_of` says)."""
    ends: dict[int, int] = {}
    out = []
    for n, info in enumerate(plan.tensors):
        segment = segment_of[n] if segment_of else 0
        offset = ends.get(segment, 0)
        ends[segment] = offset + info.nbytes
        out.append(pb.TensorPlacement(tensor_index=n, segment=segment, offset=offset, crc32c=1000 + n))
    return out


def as_runs(runs: list[Run]) -> list[pb.PlacementRun]:
    """What a server that groups sends for the same runs."""
    names = {torch.bfloat16: "BF16", torch.float32: "F32", torch.int8: "I8"}
    return [pb.PlacementRun(segment=r.segment, offset=r.offset, dtype=names[r.dtype], shape=r.shape, nbytes=r.nbytes,
                            tensor_index=r.indices, crc32c=r.crcs) for r in runs]  # fmt: skip


def refused(grant: pb.ShardSegments, plan: pb.GetManifestResponse, match: str) -> None:
    with pytest.raises(FetchError, match=match) as caught:
        runs_of(grant, plan)
    assert caught.value.code() == grpc.StatusCode.DATA_LOSS


def test_back_to_back_tensors_of_one_dtype_and_shape_make_one_run() -> None:
    plan = manifest(BF16, BF16, BF16, F32, F32, I8, BF16, BF16)
    runs = runs_of(pb.ShardSegments(tensors=placements(plan)), plan)
    assert [(r.dtype, r.indices) for r in runs] == [
        (torch.bfloat16, [0, 1, 2]), (torch.float32, [3, 4]), (torch.int8, [5]), (torch.bfloat16, [6, 7])
    ]  # fmt: skip
    assert runs[0].crcs == [1000, 1001, 1002]
    assert (runs[1].offset, runs[1].end) == (192, 320)
    assert names_of(manifest_names(plan), runs)[3] == ["t.6", "t.7"]


def test_a_run_breaks_at_a_new_segment_or_a_gap() -> None:
    plan = manifest(BF16, BF16, BF16, BF16)
    split = runs_of(pb.ShardSegments(tensors=placements(plan, segment_of=[0, 0, 1, 1])), plan)
    assert [(r.segment, r.offset, r.indices) for r in split] == [(0, 0, [0, 1]), (1, 0, [2, 3])]
    gapped = placements(plan)
    gapped[2].offset += 64
    gapped[3].offset += 64
    assert [r.indices for r in runs_of(pb.ShardSegments(tensors=gapped), plan)] == [[0, 1], [2, 3]]


def test_a_servers_runs_read_the_same_as_its_per_tensor_placements() -> None:
    plan = manifest(*([BF16] * 50 + [F32] * 3 + [I8] * 4 + [BF16] * 2))
    grouped = runs_of(pb.ShardSegments(tensors=placements(plan)), plan)
    assert runs_of(pb.ShardSegments(runs=as_runs(grouped)), plan) == grouped


def grouped_grant(plan: pb.GetManifestResponse) -> pb.ShardSegments:
    return pb.ShardSegments(runs=as_runs(runs_of(pb.ShardSegments(tensors=placements(plan)), plan)))


@pytest.mark.fault("shared-memory grant that disagrees with its manifest")
@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda runs: runs[0].tensor_index.append(99), "lists 4 tensors and 3 crc32c"),
        (lambda runs: (runs[0].tensor_index.append(99), runs[0].crc32c.append(0)), "names tensor 99 of 5"),
        (lambda runs: runs[0].tensor_index.__setitem__(1, 2), "repeats tensors"),
        (lambda runs: runs[0].tensor_index.__setitem__(slice(None), [1, 0, 2]), "out of manifest order"),
        (lambda runs: (runs.add().CopyFrom(runs[0]), runs.__delitem__(0)), "out of manifest order"),
        (lambda runs: runs[0].shape.__setitem__(1, 9), "shaped"),
        (lambda runs: runs[0].shape.__setitem__(slice(None), [-4, -8]), "shaped"),
        (lambda runs: setattr(runs[0], "dtype", "F16"), "not as in its manifest"),
        (lambda runs: setattr(runs[0], "dtype", "Q4_K"), "Q4_K"),
        (lambda runs: (setattr(runs[1], "nbytes", 32), runs[1].shape.__setitem__(0, 8)), "not as in its manifest"),
        (lambda runs: runs[0].ClearField("tensor_index"), "lists 0 tensors"),
    ],
)
def test_a_run_that_disagrees_with_itself_or_the_manifest_is_data_loss(damage: object, match: str) -> None:
    plan = manifest(BF16, BF16, BF16, F32, F32)
    grant = grouped_grant(plan)
    damage(grant.runs)  # type: ignore[operator]
    refused(grant, plan, match)


@pytest.mark.fault("shared-memory grant that disagrees with its manifest")
def test_runs_holding_other_bytes_than_the_whole_plan_are_data_loss() -> None:
    """A later tensor of a run is not looked up one by one; the plan's byte total catches it."""
    plan = manifest(BF16, BF16, F32)
    grant = grouped_grant(plan)
    plan.tensors[1].nbytes = 32  # the manifest says tensor 1 is smaller than its run's first
    plan.tensors[1].shape[:] = [4, 4]
    plan.total_bytes = 64 + 32 + 64
    refused(grant, plan, "hold 192 bytes of a 160-byte plan")


@pytest.mark.fault("shared-memory grant that disagrees with its manifest")
@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda ps: setattr(ps[2], "tensor_index", 7), "names tensor 7 of 3"),
        (lambda ps: setattr(ps[1], "tensor_index", 0), "out of manifest order"),
        (lambda ps: ps.__setitem__(slice(None), [ps[1], ps[0], ps[2]]), "out of manifest order"),
    ],
)
def test_per_tensor_placements_out_of_order_or_out_of_the_plan_are_data_loss(damage: object, match: str) -> None:
    plan = manifest(BF16, BF16, F32)
    ps = placements(plan)
    damage(ps)  # type: ignore[operator]
    refused(pb.ShardSegments(tensors=ps), plan, match)


def test_an_empty_grant_is_no_runs() -> None:
    plan = manifest()
    assert runs_of(pb.ShardSegments(), plan) == []
