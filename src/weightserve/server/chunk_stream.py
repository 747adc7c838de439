"""Turning tensor plans into TensorChunk messages, reading ahead of the send.

With TRANSPORT_GRPC_PACKED, runs of small whole tensors are packed several to a
message (`packed_jobs`, `read_pack`): gRPC costs tens of microseconds a message on each
side, which for 10,000 tensors of 4 KiB was most of the fetch.

Chunks come from the model cache or are read on the thread pool (each thread reads
into its own reused buffer and frames the message there), at most `read_ahead` (--prefetch-depth) per
stream at a time. The next chunk is requested only when gRPC has taken the previous
one (flow control), so a slow client never makes the server hold more than its
window for it.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from weightserve import wire
from weightserve.cache.entry import CachedChunk, CachedPack, ModelEntry
from weightserve.cache.manifests import Manifest
from weightserve.cache.model_cache import ModelCache
from weightserve.errors import CorruptCheckpointError
from weightserve.loaders.pieces import read_range
from weightserve.loaders.sources import Source
from weightserve.server.message_buffer import build_message
from weightserve.sharding.tensor_plan import TensorPlan

_buffers = threading.local()


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

    Chunks never span two tensors; an empty tensor is one empty chunk. Boundaries are
    multiples of `chunk_bytes` from the tensor's start, so a resumed stream meets the
    same cached chunks as a fresh one.
    """
    for position, index in enumerate(selection):
        size = plans[index].nbytes
        offset = start_offset if position == 0 else 0
        first = True
        while True:
            length = min(chunk_bytes - offset % chunk_bytes, size - offset)
            last = offset + length >= size
            yield ChunkJob(index, offset, length, first, last)
            if last:
                break
            offset += length
            first = False


@dataclass(frozen=True)
class PackJob:
    """Several small whole tensors in one message (TRANSPORT_GRPC_PACKED): plans[i] for i in `indices`."""

    indices: tuple[int, ...]


PACK_FRACTION = 4
"""A tensor is packed when it is at most chunk_bytes / PACK_FRACTION (1 MiB at the 4 MiB default)."""

MAX_PACKED = 4096
"""Most tensors in one packed message (bounds its framing: empty tensors take no data)."""


def packed_jobs(
    plans: list[TensorPlan], selection: list[int], start_offset: int, chunk_bytes: int
) -> Iterator[ChunkJob | PackJob]:
    """chunk_jobs, with runs of small whole tensors packed into messages of up to `chunk_bytes`.

    A tensor resumed mid-way is chunked from its offset, as are tensors over
    chunk_bytes / PACK_FRACTION; a resumed stream starts a new pack at its tensor.
    """
    limit = chunk_bytes // PACK_FRACTION
    run: list[int] = []
    size = 0
    for position, index in enumerate(selection):
        nbytes = plans[index].nbytes
        offset = start_offset if position == 0 else 0
        if offset or nbytes > limit:
            if run:
                yield PackJob(tuple(run))
                run, size = [], 0
            yield from chunk_jobs(plans, [index], offset, chunk_bytes)
            continue
        if run and (size + nbytes > chunk_bytes or len(run) == MAX_PACKED):
            yield PackJob(tuple(run))
            run, size = [], 0
        run.append(index)
        size += nbytes
    if run:
        yield PackJob(tuple(run))


def read_pack(
    plans: list[TensorPlan],
    sources: list[Source],
    indices: tuple[int, ...],
    cached: list[CachedChunk | None],
) -> CachedPack:
    """Read and frame one packed chunk (runs on the read pool).

    Each tensor comes from its cached chunk where one is given, else from its file;
    tensors lying back to back in one file are read with one call. The tensors read
    from files are also framed as canonical chunks (CachedPack.chunks), for the
    streams waiting on this read and for the memory cache.
    """
    sizes = [plans[i].nbytes for i in indices]
    crcs: list[int] = []

    def fill(prefix: memoryview, payload: memoryview) -> None:
        at = 0
        pending: tuple[int, int, int] | None = None  # (source, file offset, payload offset) of a coalesced read
        pending_len = 0
        for index, nbytes, chunk in zip(indices, sizes, cached, strict=True):
            pieces = plans[index].pieces
            if chunk is not None:
                payload[at : at + nbytes] = chunk.payload
            elif len(pieces) == 1 and pieces[0].rows == 1 and pieces[0].source >= 0:
                piece = pieces[0]
                if (
                    pending is not None
                    and pending[0] == piece.source
                    and pending[1] + pending_len == piece.offset  # next in the file
                    and pending[2] + pending_len == at  # and next in the message
                ):
                    pending_len += nbytes
                else:
                    if pending is not None:
                        sources[pending[0]].read_into(pending[1], payload[pending[2] : pending[2] + pending_len])
                    pending, pending_len = (piece.source, piece.offset, at), nbytes
            else:
                read_range(plans[index], sources, 0, payload[at : at + nbytes])
            at += nbytes
        if pending is not None:
            sources[pending[0]].read_into(pending[1], payload[pending[2] : pending[2] + pending_len])
        at = 0
        for nbytes in sizes:
            crcs.append(wire.crc32c(payload[at : at + nbytes]))
            at += nbytes
        # the message's crc hashes the bytes a second time: crc32c_combine, in Python, costs
        # more per tensor than hashing a 4 MiB message again
        prefix[:] = framing(wire.crc32c(payload))

    def framing(crc: int) -> bytes:
        return wire.encode_packed_prefix(indices=indices, sizes=sizes, crcs=crcs or [0] * len(indices), crc=crc)

    prefix_len = len(framing(0))
    message = build_message(prefix_len, sum(sizes), fill)
    fresh: list[CachedChunk | None] = []
    at = len(message) - sum(sizes)
    for index, nbytes, crc, hit in zip(indices, sizes, crcs, cached, strict=True):
        if hit is None:
            prefix = wire.encode_chunk_prefix(header=header_of(plans[index]), tensor_index=index, offset=0, crc=crc,
                                              last=False, tensor_crc=0, data_len=nbytes)  # fmt: skip
            fresh.append(CachedChunk(prefix + message[at : at + nbytes], len(prefix), crc))
        else:
            fresh.append(None)
        at += nbytes
    return CachedPack(message, tuple(crcs), tuple(fresh))


def _thread_buffer(size: int) -> bytearray:
    buf: bytearray | None = getattr(_buffers, "buf", None)
    if buf is None or len(buf) < size:
        buf = _buffers.buf = bytearray(size)
    return buf


def header_of(plan: TensorPlan) -> bytes:
    return wire.encode_tensor_header(plan.name, plan.dtype, plan.shape, plan.nbytes)


def read_chunk(
    plan: TensorPlan, sources: list[Source], index: int, offset: int, length: int, in_place: bool = True
) -> CachedChunk:
    """Read and frame one chunk (runs on the read pool).

    The file's bytes are read straight into the message that carries them (unless
    `in_place` is off: see message_buffer.py); the framing, whose length does not
    depend on the checksum (a fixed32), is written in front once the payload's
    checksum is known.
    """
    header = header_of(plan) if offset == 0 else None

    def framing(crc: int) -> bytes:
        return wire.encode_chunk_prefix(
            header=header, tensor_index=index, offset=offset, crc=crc, last=False, tensor_crc=0, data_len=length
        )

    crc = 0

    def fill(prefix: memoryview, payload: memoryview) -> None:
        nonlocal crc
        read_range(plan, sources, offset, payload)
        crc = wire.crc32c(payload)
        prefix[:] = framing(crc)

    prefix_len = len(framing(0))
    return CachedChunk(build_message(prefix_len, length, fill, in_place=in_place), prefix_len, crc)


def prefix_crc(plan: TensorPlan, sources: list[Source], length: int) -> int:
    """crc32c of the first `length` bytes of a tensor (for a resume mid-tensor)."""
    buf = _thread_buffer(wire.MAX_CHUNK_BYTES)
    crc, done = 0, 0
    while done < length:
        n = min(len(buf), length - done)
        view = memoryview(buf)[:n]
        read_range(plan, sources, done, view)
        crc = wire.crc32c(view, crc)
        done += n
    return crc


class ChunkFramer:
    """Tracks each tensor's running checksum and frames what a stream sends."""

    def __init__(self, plans: list[TensorPlan], known_digests: dict[int, int]) -> None:
        self.plans = plans
        self.known = known_digests
        self.finished: dict[int, int] = {}  # tensor index -> digest computed in this stream
        self._running: int | None = 0

    def start(self, prior_crc: int | None) -> None:
        """Begin a tensor whose skipped prefix has checksum `prior_crc` (None: digest known)."""
        self._running = prior_crc

    def frame(self, job: ChunkJob, chunk: CachedChunk) -> bytes:
        """The message to send for `job`.

        Raises:
            CorruptCheckpointError: the tensor's bytes no longer match its known digest.
        """
        if self._running is not None:
            self._running = wire.crc32c_combine(self._running, chunk.crc, job.length)
        resumed_mid_tensor = job.first and job.offset > 0
        if not job.last and not resumed_mid_tensor:
            return chunk.message
        tensor_crc = 0
        if job.last:
            tensor_crc = self._running if self._running is not None else self.known.get(job.index) or 0
            self._finish(job.index, tensor_crc)
        prefix = wire.encode_chunk_prefix(
            header=header_of(self.plans[job.index]) if job.first else None,
            tensor_index=job.index,
            offset=job.offset,
            crc=chunk.crc,
            last=job.last,
            tensor_crc=tensor_crc,
            data_len=job.length,
        )
        return b"".join((prefix, chunk.payload))

    def frame_pack(self, job: PackJob, pack: CachedPack) -> bytes:
        """The packed message for `job`, after checking each tensor against its known digest.

        Raises:
            CorruptCheckpointError: a tensor's bytes no longer match its known digest.
        """
        for index, crc in zip(job.indices, pack.crcs, strict=True):
            self._finish(index, crc)
        return pack.message

    def _finish(self, index: int, crc: int) -> None:
        """Record a whole tensor's crc32c, after checking it against the digest known for it.

        Raises:
            CorruptCheckpointError: they differ.
        """
        expected = self.known.get(index)
        if expected is not None and expected != crc:
            raise CorruptCheckpointError(
                f"tensor {self.plans[index].name!r}: its bytes have crc32c {crc:#010x}, not the "
                f"{expected:#010x} recorded for it; the file is damaged or changed while served"
            )
        self.finished[index] = crc


async def stream_chunks(
    cache: ModelCache,
    entry: ModelEntry,
    manifest: Manifest,
    jobs: Iterator[ChunkJob | PackJob],
    framer: ChunkFramer,
    executor: Executor,
    *,
    read_ahead: int,
    in_place: bool = True,
) -> AsyncIterator[bytes]:
    """Yield framed chunks for `jobs`, fetching up to `read_ahead` chunks ahead."""
    loop = asyncio.get_running_loop()
    sources = entry.sources
    plans = manifest.tensors

    def fetch_pack(job: PackJob) -> asyncio.Future[CachedPack]:
        keys = [(manifest.manifest_id, i, 0, plans[i].nbytes) for i in job.indices]

        async def read(known: list[CachedChunk | None]) -> CachedPack:
            return await loop.run_in_executor(executor, read_pack, plans, sources, job.indices, known)

        return asyncio.ensure_future(cache.pack(entry, keys, read))

    def fetch(job: ChunkJob) -> asyncio.Future[CachedChunk]:
        key = (manifest.manifest_id, job.index, job.offset, job.length)
        future: asyncio.Future[CachedChunk]
        if (cached := entry.cached_chunk(key)) is not None:  # the warm path: no task, no thread
            cache.recorder.cache_lookup(True)
            cache.recorder.bytes_read("cache", job.length)
            future = loop.create_future()
            future.set_result(cached)
            return future
        plan = plans[job.index]

        async def fill() -> CachedChunk:
            return await loop.run_in_executor(
                executor, read_chunk, plan, sources, job.index, job.offset, job.length, in_place
            )

        return asyncio.ensure_future(cache.chunk(entry, key, fill))

    pending: collections.deque[tuple[ChunkJob | PackJob, asyncio.Future[Any]]] = collections.deque()
    jobs = iter(jobs)
    try:
        while True:
            while len(pending) < read_ahead and (job := next(jobs, None)) is not None:
                pending.append((job, fetch_pack(job) if isinstance(job, PackJob) else fetch(job)))
            if not pending:
                return
            job, task = pending.popleft()
            if isinstance(job, PackJob):
                yield framer.frame_pack(job, await task)
                continue
            chunk = await task
            if job.first:
                prior: int | None = 0
                if job.offset and job.index in framer.known:
                    prior = None
                elif job.offset:
                    prior = await loop.run_in_executor(executor, prefix_crc, plans[job.index], sources, job.offset)
                framer.start(prior)
            yield framer.frame(job, chunk)
    finally:
        for _, task in pending:
            task.cancel()
