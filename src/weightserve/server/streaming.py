"""Turning tensor plans into encoded TensorChunk messages, reading ahead of the send.

Reads and checksums run on a thread pool; the event loop only frames and yields.
At most `read_ahead` chunks are in flight per stream, each in a reused buffer, and
the next one is read only when gRPC has taken the previous (flow control), so a slow
client never makes the server hold more than a few chunks for it.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass

from weightserve import wire
from weightserve.errors import CorruptCheckpointError
from weightserve.loaders.sources import Source
from weightserve.sharding.plan import TensorPlan, read_range
from weightserve.v1 import weightserve_pb2 as pb


@dataclass(frozen=True)
class ChunkJob:
    """One chunk to send: bytes [offset, offset + length) of plans[index]."""

    index: int
    offset: int
    length: int
    first: bool
    last: bool


def chunk_jobs(
    plans: list[TensorPlan], selection: list[int], start_offset: int, chunk_bytes: int
) -> Iterator[ChunkJob]:
    """Chunks for the selected tensors, the first starting at `start_offset`.

    Chunks never span two tensors; an empty tensor is one empty chunk.
    """
    for position, index in enumerate(selection):
        size = plans[index].nbytes
        offset = start_offset if position == 0 else 0
        first = True
        while True:
            length = min(chunk_bytes, size - offset)
            last = offset + length >= size
            yield ChunkJob(index, offset, length, first, last)
            if last:
                break
            offset += length
            first = False


def _read_and_sum(plan: TensorPlan, sources: list[Source], job: ChunkJob, buf: bytearray) -> int:
    view = memoryview(buf)[: job.length]
    read_range(plan, sources, job.offset, view)
    return wire.crc32c(view)


def prefix_crc(plan: TensorPlan, sources: list[Source], length: int, buf: bytearray) -> int:
    """crc32c of the first `length` bytes of a tensor (for a resume mid-tensor)."""
    crc, done = 0, 0
    while done < length:
        n = min(len(buf), length - done)
        view = memoryview(buf)[:n]
        read_range(plan, sources, done, view)
        crc = wire.crc32c(view, crc)
        done += n
    return crc


class ChunkEncoder:
    """Frames one stream's chunks and tracks each tensor's running checksum."""

    def __init__(self, plans: list[TensorPlan], known_digests: dict[int, int]) -> None:
        self.plans = plans
        self.known = known_digests
        self.finished: dict[int, int] = {}  # tensor index -> digest computed in this stream
        self._running: int | None = 0

    def start(self, prior_crc: int | None) -> None:
        """Begin a tensor whose skipped prefix has checksum `prior_crc`.

        None means the prefix was not read because the tensor's digest is already
        known; the last chunk then carries that digest.
        """
        self._running = prior_crc

    def encode(self, job: ChunkJob, crc: int, payload: memoryview) -> bytes:
        """The TensorChunk message for `job` whose payload has checksum `crc`.

        Raises:
            CorruptCheckpointError: the tensor's bytes no longer match its known digest.
        """
        if self._running is not None:
            self._running = wire.crc32c_combine(self._running, crc, job.length)
        tensor_crc = 0
        if job.last:
            expected = self.known.get(job.index)
            tensor_crc = self._running if self._running is not None else expected or 0
            if expected is not None and expected != tensor_crc:
                plan = self.plans[job.index]
                raise CorruptCheckpointError(
                    f"tensor {plan.name!r} no longer matches its digest; its file changed while served"
                )
            self.finished[job.index] = tensor_crc
        header = None
        if job.first:
            plan = self.plans[job.index]
            header = pb.TensorHeader(
                name=plan.name, dtype=plan.dtype, shape=plan.shape, nbytes=plan.nbytes
            ).SerializeToString()
        prefix = wire.encode_chunk_prefix(
            header=header,
            tensor_index=job.index,
            offset=job.offset,
            crc=crc,
            last=job.last,
            tensor_crc=tensor_crc,
            data_len=job.length,
        )
        return b"".join((prefix, payload))


async def stream_chunks(
    plans: list[TensorPlan],
    sources: list[Source],
    jobs: Iterator[ChunkJob],
    encoder: ChunkEncoder,
    executor: Executor,
    *,
    chunk_bytes: int,
    read_ahead: int,
) -> AsyncIterator[bytes]:
    """Yield encoded chunks for `jobs`, reading up to `read_ahead` chunks ahead."""
    loop = asyncio.get_running_loop()
    free = [bytearray(chunk_bytes) for _ in range(read_ahead)]
    pending: collections.deque[tuple[ChunkJob, bytearray, asyncio.Future[int]]] = collections.deque()
    jobs = iter(jobs)
    exhausted = False
    while True:
        while not exhausted and free:
            job = next(jobs, None)
            if job is None:
                exhausted = True
                break
            buf = free.pop()
            future = loop.run_in_executor(executor, _read_and_sum, plans[job.index], sources, job, buf)
            pending.append((job, buf, future))
        if not pending:
            return
        job, buf, future = pending.popleft()
        crc = await future
        if job.first:
            prior: int | None = 0
            if job.offset and job.index in encoder.known:
                prior = None
            elif job.offset:
                prior = await loop.run_in_executor(
                    executor, prefix_crc, plans[job.index], sources, job.offset, bytearray(chunk_bytes)
                )
            encoder.start(prior)
        message = encoder.encode(job, crc, memoryview(buf)[: job.length])
        free.append(buf)
        yield message
