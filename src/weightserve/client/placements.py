"""Where a shared-memory grant puts each tensor, read as runs and checked before anything is mapped.

A run is tensors of one dtype and shape lying back to back in one segment (a layer's
experts, a model's norms): the client views a whole run at once, so a plan of 10,000
small tensors costs a few strided views and an `unbind`, not 10,000 protobuf lookups.
A server that sends runs (FetchShardSegmentsRequest.runs) has done the grouping; an
older one sends a TensorPlacement a tensor, grouped here with the manifest's shapes.
Either way the runs are checked against the manifest, so a bad grant is DATA_LOSS,
never a tensor of the wrong shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import torch

from weightserve import wire
from weightserve.client.gc_pause import gc_paused
from weightserve.errors import FetchError
from weightserve.v1 import weightserve_pb2 as pb


@dataclass
class Run:
    """`len(indices)` tensors shaped `shape` at byte `offset + i * nbytes` of segment `segment`."""

    segment: int
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    indices: list[int]
    """Manifest positions of the run's tensors, ascending."""
    crcs: list[int]
    """crc32c of each tensor's bytes, parallel to indices."""

    @property
    def end(self) -> int:
        return self.offset + len(self.indices) * self.nbytes


def runs_of(grant: pb.ShardSegments, manifest: pb.GetManifestResponse) -> list[Run]:
    """The grant's placements as runs in manifest order, checked against the manifest.

    Raises:
        FetchError: DATA_LOSS when a placement names no tensor of the manifest, repeats
            or reorders tensors, or disagrees with the manifest on a tensor's dtype, shape
            or size.
    """
    runs = _from_runs(grant.runs, manifest) if grant.runs else _from_placements(grant.tensors, manifest)
    previous = -1
    for run in runs:
        if run.indices[0] <= previous:
            raise _bad(f"placements name tensor {run.indices[0]} out of manifest order")
        previous = run.indices[-1]
    return runs


def manifest_names(manifest: pb.GetManifestResponse) -> list[str]:
    """Every tensor name of the manifest, by position (~0.3 us a tensor: a client makes the list while the
    server answers FetchShardSegments)."""
    with gc_paused():
        return [info.name for info in manifest.tensors]


def names_of(all_names: Sequence[str], runs: Sequence[Run]) -> list[list[str]]:
    """Each run's tensor names, out of `manifest_names`."""
    return [[all_names[i] for i in run.indices] for run in runs]


def _from_runs(messages: Sequence[pb.PlacementRun], manifest: pb.GetManifestResponse) -> list[Run]:
    """Runs as the server grouped them; each run's first tensor and the plan's byte total checked."""
    infos = manifest.tensors
    count = len(infos)
    runs = []
    placed_bytes = placed = 0
    for message in messages:
        indices, crcs = list(message.tensor_index), list(message.crc32c)
        if not indices or len(crcs) != len(indices):
            raise _bad(f"a run lists {len(indices)} tensors and {len(crcs)} crc32c")
        if indices[-1] >= count:
            raise _bad(f"a placement names tensor {indices[-1]} of {count}")
        if indices != sorted(set(indices)):
            raise _bad("a run repeats tensors or lists them out of manifest order")
        run = Run(message.segment, message.offset, _dtype(message.dtype), tuple(message.shape), message.nbytes,
                  indices, crcs)  # fmt: skip
        _check_geometry(run, infos[indices[0]])
        runs.append(run)
        placed += len(indices)
        placed_bytes += len(indices) * run.nbytes
    if placed == count and placed_bytes != manifest.total_bytes:
        raise _bad(f"the runs hold {placed_bytes} bytes of a {manifest.total_bytes}-byte plan")
    return runs


def _from_placements(placements: Sequence[pb.TensorPlacement], manifest: pb.GetManifestResponse) -> list[Run]:
    """A TensorPlacement a tensor (a server without runs), grouped into runs with the manifest's shapes."""
    infos = manifest.tensors
    count = len(infos)
    runs: list[Run] = []
    last: Run | None = None
    last_key: tuple[int, str, object] = (-1, "", None)
    for at in placements:
        index = at.tensor_index
        if index >= count:
            raise _bad(f"a placement names tensor {index} of {count}")
        info = infos[index]
        key = (at.segment, info.dtype, info.shape)
        if last is not None and key == last_key and at.offset == last.end and info.nbytes == last.nbytes:
            if index <= last.indices[-1]:
                raise _bad(f"placements name tensor {index} out of manifest order")
            last.indices.append(index)
            last.crcs.append(at.crc32c)
            continue
        last = Run(at.segment, at.offset, _dtype(info.dtype), tuple(info.shape), info.nbytes, [index], [at.crc32c])
        _check_geometry(last, info)
        last_key = key
        runs.append(last)
    return runs


def _check_geometry(run: Run, first: pb.TensorInfo) -> None:
    """The run's shape and size agree with each other and with the manifest's first tensor."""
    if any(dim < 0 for dim in run.shape) or math.prod(run.shape) * run.dtype.itemsize != run.nbytes:
        raise _bad(f"a run of {run.nbytes}-byte tensors is shaped {list(run.shape)} of {run.dtype}")
    if (_dtype(first.dtype), tuple(first.shape), first.nbytes) != (run.dtype, run.shape, run.nbytes):
        raise _bad(f"the grant places {first.name!r} as {list(run.shape)} {run.dtype}, not as in its manifest")


def _dtype(name: str) -> torch.dtype:
    try:
        return wire.torch_dtype(name)
    except Exception as e:  # an unknown dtype name from the server
        raise _bad(str(e)) from None


def _bad(why: str) -> FetchError:
    return FetchError(f"shared memory: {why}", grpc.StatusCode.DATA_LOSS)
