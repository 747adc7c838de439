"""Publishing versions and applying deltas: what the sync and asyncio clients share.

`upload_requests` frames a state dict as FetchShard frames tensors (chunks with crc32c,
a header on each tensor's first, the whole tensor's crc32c on its last), starting each
tensor where the server says its part ends, so a broken upload resumes without
resending what arrived. `apply_update` checks a whole delta against its targets before
it writes anything, so a bad update changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
import numpy as np
import torch

from weightserve import wire
from weightserve.client.common import fetch_error
from weightserve.errors import InvalidRequestError
from weightserve.v1 import weightserve_pb2 as pb

CHUNK_BYTES = 4 * 1024 * 1024 - 16 * 1024
"""Payload per upload chunk: the server's own, so each message stays under gRPC's 4 MiB."""


@dataclass(frozen=True)
class Outgoing:
    """One tensor of an upload, as bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def outgoing(state_dict: Mapping[str, torch.Tensor]) -> list[Outgoing]:
    """The tensors to upload, in name order, as contiguous CPU bytes.

    Raises:
        InvalidRequestError: a value is not a tensor, or its dtype has no safetensors name.
    """
    out = []
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            raise InvalidRequestError(f"{name}: {type(tensor).__name__} is not a tensor")
        dtype = wire.dtype_name(tensor.dtype)
        cpu = tensor.detach().to("cpu").contiguous()
        out.append(Outgoing(name, dtype, tuple(cpu.shape), cpu.reshape(-1).view(torch.uint8).numpy()))
    return out


def start_request(model: str, tensors: Sequence[Outgoing], base: int | None) -> pb.StartPublishRequest:
    return pb.StartPublishRequest(
        model=model,
        base_version=base,
        tensors=[pb.TensorInfo(name=t.name, dtype=t.dtype, shape=t.shape, nbytes=t.nbytes) for t in tensors],
    )


def upload_requests(
    upload_id: str, tensors: Sequence[Outgoing], received: Sequence[int], chunk_bytes: int = CHUNK_BYTES
) -> Iterator[pb.PublishVersionRequest]:
    """The stream of an upload from where the server is (`received` bytes of each tensor), then the commit."""
    for index, tensor in enumerate(tensors):
        start = received[index] if index < len(received) else 0
        if start >= tensor.nbytes and tensor.nbytes:
            continue
        view = memoryview(tensor.data)  # type: ignore[arg-type]
        running = wire.crc32c(view[:start]) if start else 0
        offset = start
        while True:
            data = view[offset : offset + chunk_bytes]
            crc = wire.crc32c(data)
            running = wire.crc32c_combine(running, crc, len(data))
            last = offset + len(data) >= tensor.nbytes
            chunk = pb.TensorChunk(
                tensor_index=index, offset=offset, crc32c=crc, last=last, tensor_crc32c=running if last else 0,
                data=bytes(data),
            )  # fmt: skip
            if offset == 0:
                chunk.header.CopyFrom(pb.TensorHeader(name=tensor.name, dtype=tensor.dtype, shape=tensor.shape,
                                                      nbytes=tensor.nbytes))  # fmt: skip
            yield pb.PublishVersionRequest(upload_id=upload_id, chunk=chunk)
            offset += len(data)
            if last:
                break
    yield pb.PublishVersionRequest(upload_id=upload_id, commit=True)


def apply_update(targets: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], model: str) -> None:
    """Write every tensor of a verified delta into its target, after checking them all.

    Raises:
        InvalidRequestError: a delta tensor has no target, or another shape or dtype;
            nothing was written.
    """
    problems = []
    for name, tensor in delta.items():
        target = targets.get(name)
        if target is None:
            problems.append(f"{name}: not in the target")
        elif target.shape != tensor.shape or target.dtype != tensor.dtype:
            problems.append(f"{name}: {tensor.dtype} {list(tensor.shape)} for a {target.dtype} {list(target.shape)}")
    if problems:
        raise InvalidRequestError(f"update of {model} refused, nothing written: {'; '.join(problems[:5])}")
    with torch.no_grad():
        for name, tensor in delta.items():
            targets[name].copy_(tensor)


class VersionWatch:
    """A WatchVersions stream: iterate it for new versions; `close()` ends it from any thread."""

    def __init__(self, call: Any, model: str) -> None:
        self._call = call
        self.model = model

    def __iter__(self) -> Iterator[pb.VersionInfo]:
        try:
            yield from self._call
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise fetch_error(e, f"watch versions of {self.model}") from None

    def close(self) -> None:
        """End the stream (and the lease it holds); an iteration in progress stops quietly."""
        self._call.cancel()

    def __enter__(self) -> VersionWatch:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
