"""Rebuilding tensors from verified chunks, and knowing where to resume.

Transport-free: a FetchSession is fed raw TensorChunk messages and says what to ask
for next. Each tensor is allocated once and every chunk is written straight into its
storage after its checksum matches, so nothing partial or corrupt is ever returned,
and a broken stream resumes at the first byte not yet verified.

On the CPU every tensor of a fetch is a view into one arena: a single private
anonymous mapping of the fetch's size (`allocate_arena`), each tensor's pages made in
one call as its first chunk arrives (`populate`) instead of one page fault per 4 KiB
as chunks land, which was most of the client's CPU time. The arena is freed when the
last of its tensors is.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from google.protobuf.message import DecodeError

from weightserve import wire
from weightserve.client.gc_pause import gc_paused
from weightserve.errors import IntegrityError
from weightserve.v1 import weightserve_pb2 as pb


@dataclass
class TensorProgress:
    """A tensor being received."""

    info: pb.TensorInfo
    index: int
    received: int = 0
    running_crc: int = 0
    tensor: torch.Tensor | None = None
    flat: np.ndarray | None = None
    """The tensor's bytes as a numpy view, for CPU tensors (made once, written per chunk)."""
    done: bool = False


@dataclass
class FetchStats:
    """What one fetch cost and where it came from, for callers, logs and tests.

    The client fills it while the fetch runs (`WeightClient.last_fetch_stats`), so a
    watcher sees the counts grow; `seconds` is set when the fetch ends, either way.
    """

    attempts: int = 0
    """Streams opened."""
    bytes_received: int = 0
    """Bytes of every message received, framing included."""
    payload_bytes: int = 0
    """Verified tensor bytes written into the state dict."""
    integrity_retries: int = 0
    """Chunks that failed their checksum, each asked for again (the last one fails the fetch if over the policy)."""
    bytes_after_reconnect: int = 0
    reconnects: int = 0
    """Streams that broke and were resumed from the last verified byte."""
    retry_wait_seconds: float = 0.0
    """Time spent waiting to resume (backoff and waiting for the server), over all breaks."""
    tensors: int = 0
    """Tensors the fetch asked for."""
    seconds: float = 0.0
    """Wall time of the whole fetch: the manifest, every stream and every wait."""
    time_to_first_chunk: float | None = None
    """Seconds from the start of the fetch to its first chunk; None until one arrives."""
    replica: str = ""
    """The server address the fetch streamed from."""
    version: int = 0
    """The published version of the weights fetched (0: the checkpoint)."""

    @property
    def resumes(self) -> int:
        """Streams resumed after a break (`reconnects`)."""
        return self.reconnects

    @property
    def rerequests(self) -> int:
        """Chunks asked for again after a failed checksum (`integrity_retries`)."""
        return self.integrity_retries

    def summary(self) -> str:
        """One line: "812 tensors, 1.2 GB in 1.4 s (0.86 GB/s), first chunk after 0.05 s, 0 resumes, ..."."""
        rate = self.payload_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0
        first = (
            "no chunk" if self.time_to_first_chunk is None else f"first chunk after {self.time_to_first_chunk:.2f} s"
        )
        return (
            f"{self.tensors} tensors, {_size(self.payload_bytes)} in {self.seconds:.2f} s ({rate:.2f} GB/s), {first}, "
            f"{self.resumes} resumes, {self.rerequests} re-requests from {self.replica or 'the server'}"
        )


def _size(nbytes: int) -> str:
    """Bytes in decimal units, three figures or so: 1.2 GB, 880.0 MB, 512 B."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


class _DeviceWriter:
    """Copies verified chunks into device tensors through a small ring of pinned buffers."""

    RING = 4

    def __init__(self, device: torch.device, chunk_bytes: int) -> None:
        self.device = device
        pin = torch.cuda.is_available() and device.type == "cuda"
        self.buffers = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(self.RING)]
        self.events: list[torch.cuda.Event | None] = [None] * self.RING
        self.pinned = pin
        self.slot = 0

    def write(self, dest: torch.Tensor, offset: int, data: memoryview) -> None:
        slot = self.slot
        self.slot = (slot + 1) % self.RING
        event = self.events[slot]
        if event is not None:
            event.synchronize()  # the copy that last used this buffer has finished
        if len(data) > self.buffers[slot].numel():
            raise IntegrityError(f"a chunk of {len(data)} bytes, over the plan's max_chunk_bytes")
        staging = self.buffers[slot][: len(data)]
        staging.numpy()[:] = np.frombuffer(data, dtype=np.uint8)
        dest[offset : offset + len(data)].copy_(staging, non_blocking=self.pinned)
        if self.pinned:
            event = torch.cuda.Event()
            event.record()
            self.events[slot] = event

    def finish(self) -> None:
        for event in self.events:
            if event is not None:
                event.synchronize()


MADV_POPULATE_WRITE = 23
"""Linux's madvise advice that faults a range in, writable, in one call (not in Python's mmap module)."""

ARENA_ALIGN = 64
"""Byte alignment of each tensor in the arena (a cache line; enough for every dtype and for SIMD)."""


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ARENA_ALIGN) * ARENA_ALIGN


HUGE_PAGES = False
"""Ask for transparent huge pages on the arena (madvise MADV_HUGEPAGE). Off: where the kernel
must compact memory to find them, and on some VMs, a huge page fault costs far more than
the 512 small ones it replaces (1 GiB took 10 s instead of 0.5 s on the Firecracker VM the
benchmarks ran on). A process on hosts where they are cheap may set it."""


def allocate_arena(nbytes: int) -> mmap.mmap:
    """A fresh private anonymous mapping of `nbytes` (at least one byte); nothing touched yet.

    Take tensors from it with `arena_view`: each gets a storage of its own bytes, so
    saving one tensor saves only it; the mapping lives as long as any of them.
    """
    arena = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if HUGE_PAGES and hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # a kernel without transparent huge pages
            arena.madvise(mmap.MADV_HUGEPAGE)
    return arena


def arena_view(arena: mmap.mmap, offset: int, nbytes: int) -> torch.Tensor:
    """A uint8 tensor over `nbytes` of the arena from `offset`, with a storage of exactly those bytes."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(arena, dtype=torch.uint8, count=nbytes, offset=offset)


def populate(tensor: torch.Tensor) -> None:
    """Fault in the pages of an arena view, writable, in one `madvise(MADV_POPULATE_WRITE)` call.

    About 40% less kernel time than one page fault per 4 KiB as chunks land. A no-op
    before Linux 5.14 (the pages then fault in as they are written).
    """
    if tensor.numel():
        populate_range(tensor.data_ptr(), tensor.numel() * tensor.element_size())


def populate_range(address: int, nbytes: int, advice: int = MADV_POPULATE_WRITE) -> None:
    """`populate` for the `nbytes` of memory at `address` (the pages they touch); `advice` may
    be MADV_POPULATE_READ for a mapping that must not be written. The call lets go of the GIL."""
    first = address - address % mmap.PAGESIZE
    if _LIBC is not None and nbytes:
        _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(address + nbytes - first), advice)


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc() if sys.platform.startswith("linux") else None

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOC_MMAP_THRESHOLD = 32 * 1024 * 1024
"""Allocations below this come from malloc's heaps rather than a fresh mmap each (glibc's own
dynamic ceiling on 64-bit)."""
MALLOC_TRIM_THRESHOLD = 2 * MALLOC_MMAP_THRESHOLD
"""Free memory a heap keeps before giving it back (what glibc's dynamic rule pairs with the above)."""
TUNE_MALLOC = True
"""Whether the first fetch over gRPC raises glibc's malloc thresholds (tune_malloc); a process may
clear it before fetching."""
_MALLOC_TUNED: list[bool] = []
"""Holds True once tune_malloc has applied its settings."""


def tune_malloc() -> bool:
    """Let glibc reuse freed message buffers instead of unmapping and faulting them in again.

    Every 4 MiB chunk passes through two fresh buffers (gRPC's receive slices and the
    bytes object handed to Python). With glibc's defaults the threads' heaps give that
    memory back and fault it in again for the next message, about 1.7 page faults per
    byte received and a third of the client's kernel time. Setting the thresholds to
    the ceiling glibc's own dynamic rule would reach keeps at most 64 MiB free per heap.
    Process-wide and done once, on the first fetch over gRPC; skipped where the process
    chose its own malloc settings (MALLOC_*_ environment variables, GLIBC_TUNABLES) or
    cleared TUNE_MALLOC. Returns whether the settings were applied.
    """
    if _MALLOC_TUNED:
        return True
    if _LIBC is None or not TUNE_MALLOC:
        return False
    if any(key.startswith("MALLOC_") for key in os.environ) or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    mallopt = getattr(_LIBC, "mallopt", None)  # glibc; not musl
    if mallopt is None:
        return False
    if mallopt(M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD):
        _MALLOC_TUNED.append(True)
    return bool(_MALLOC_TUNED)


class FetchSession:
    """State of one fetch_state_dict across however many streams it takes."""

    def __init__(
        self,
        manifest: pb.GetManifestResponse,
        names: list[str] | None,
        device: torch.device,
        on_bytes: Callable[[int], None] | None = None,
        destinations: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.manifest = manifest
        self.device = device
        self.stats = FetchStats()
        self.on_bytes = on_bytes
        self.destinations = destinations or {}
        with gc_paused():  # an object or two per tensor, all kept: 50,000 tensors took twice as long collecting
            by_name = {t.name: i for i, t in enumerate(manifest.tensors)}
            wanted = names if names else [t.name for t in manifest.tensors]
            order = sorted({by_name[n] for n in wanted if n in by_name})  # the stream's order
            self.pending = [TensorProgress(manifest.tensors[i], i) for i in order]  # a plan check_plan passed
            self._by_index = {p.index: p for p in self.pending}
        self._cursor = 0
        # staging no larger than the largest tensor wanted, whatever max_chunk_bytes the server claims
        staging = min(manifest.max_chunk_bytes, max((p.info.nbytes for p in self.pending), default=0))
        self._writer = None if device.type == "cpu" else _DeviceWriter(device, max(staging, 1))
        self._arena: mmap.mmap | None = None
        self._arena_array: np.ndarray | None = None
        self._arena_offsets: dict[int, int] = {}
        if self._writer is None:
            self._plan_arena()
        tune_malloc()

    def _plan_arena(self) -> None:
        """Place every CPU tensor that has no destination of its own in one arena (allocated lazily)."""
        offset = 0
        for progress in self.pending:
            info = progress.info
            if info.nbytes and self._destination(info) is None:
                self._arena_offsets[progress.index] = offset
                offset += _aligned(info.nbytes)
        self._arena_bytes = offset

    @property
    def complete(self) -> bool:
        return self._cursor >= len(self.pending)

    def resume_point(self) -> tuple[str, int] | None:
        """(tensor, verified bytes) to ask for next; None before anything arrived."""
        if self._cursor == 0 and self.pending and self.pending[0].received == 0:
            return None
        if self.complete:
            return None
        current = self.pending[self._cursor]
        return current.info.name, current.received

    def accept(self, message: bytes) -> None:
        """Verify one TensorChunk message and write its payload in place.

        Raises:
            IntegrityError: bad checksum, or a chunk out of order; the caller resumes
                from resume_point(), which has not moved past the bad chunk.
        """
        chunk = wire.decode_chunk(message)
        if self.complete:
            raise IntegrityError("server sent a chunk after the last tensor")
        if chunk.packing is not None:
            self._accept_packed(chunk, chunk.packing)
            return
        progress = self.pending[self._cursor]
        if chunk.tensor_index != progress.index or chunk.offset != progress.received:
            raise IntegrityError(
                f"expected tensor {progress.index} at byte {progress.received}, "
                f"got tensor {chunk.tensor_index} at byte {chunk.offset}"
            )
        if chunk.header is not None:
            self._check_header(progress, pb.TensorHeader.FromString(chunk.header))
        if wire.crc32c(chunk.data) != chunk.crc:
            raise IntegrityError(f"tensor {progress.info.name!r}: chunk at byte {chunk.offset} failed its crc32c")
        size = len(chunk.data)
        if progress.received + size > progress.info.nbytes:
            raise IntegrityError(f"tensor {progress.info.name!r}: more bytes than its {progress.info.nbytes}")
        if progress.tensor is None:
            progress.tensor = self._allocate(progress.info, progress.index)
            if self._writer is None:
                progress.flat = progress.tensor.reshape(-1).view(torch.uint8).numpy()
        self._write(progress, chunk.offset, chunk.data)
        # the first chunk's crc is the running crc (a tensor in one chunk: no folding at all)
        running = chunk.crc if progress.received == 0 else wire.crc32c_combine(progress.running_crc, chunk.crc, size)
        if chunk.last:
            expected = progress.info.crc32c if progress.info.HasField("crc32c") else chunk.tensor_crc
            if progress.received + size != progress.info.nbytes or running != chunk.tensor_crc or running != expected:
                progress.received, progress.running_crc = 0, 0  # refetch the whole tensor
                raise IntegrityError(f"tensor {progress.info.name!r} failed its whole-tensor crc32c")
            progress.done = True
            self._cursor += 1
        progress.received += size
        progress.running_crc = running
        self.stats.payload_bytes += size
        if self.on_bytes is not None:
            self.on_bytes(size)

    def _accept_packed(self, chunk: wire.ChunkView, packing_bytes: memoryview) -> None:
        """Verify and place each whole tensor of a packed chunk (TRANSPORT_GRPC_PACKED).

        Every tensor is checked against its own crc32c (the sizes cover all of the data,
        so every byte is checked once), in order; a tensor that fails leaves the ones
        before it done and the resume point at its first byte.
        """
        try:
            packing = pb.Packing.FromString(bytes(packing_bytes))
        except DecodeError:
            raise IntegrityError("packed chunk: its packing is not a Packing message") from None
        indices, sizes, crcs = list(packing.tensor_index), list(packing.nbytes), list(packing.crc32c)
        count = len(indices)
        if not count or len(sizes) != count or len(crcs) != count or sum(sizes) != len(chunk.data):
            raise IntegrityError("packed chunk: its packing does not describe its data")
        batch = self.pending[self._cursor : self._cursor + count]
        if len(batch) < count:
            raise IntegrityError("server packed more tensors than were asked for")
        self._populate_range(batch)
        data = np.frombuffer(chunk.data, dtype=np.uint8)
        at = 0
        for progress, index, nbytes, crc in zip(batch, indices, sizes, crcs, strict=True):
            info = progress.info
            if progress.index != index or progress.received:
                raise IntegrityError(
                    f"expected tensor {progress.index} at byte {progress.received}, got packed tensor {index}"
                )
            if nbytes != info.nbytes:
                raise IntegrityError(f"tensor {info.name!r}: packed as {nbytes} bytes, not its {info.nbytes}")
            piece = chunk.data[at : at + nbytes]
            if wire.crc32c(piece) != crc or (info.HasField("crc32c") and info.crc32c != crc):
                raise IntegrityError(f"tensor {info.name!r} failed its crc32c")
            offset = self._arena_offsets.get(index)
            if offset is not None and self._arena_array is not None:
                self._arena_array[offset : offset + nbytes] = data[at : at + nbytes]  # its tensor: at the end
            elif nbytes:
                progress.tensor = self._allocate(info, index)
                if self._writer is None:
                    progress.flat = progress.tensor.reshape(-1).view(torch.uint8).numpy()
                self._write(progress, 0, piece)
            progress.received, progress.running_crc, progress.done = nbytes, crc, True
            self._cursor += 1
            at += nbytes
            self.stats.payload_bytes += nbytes
            if self.on_bytes is not None:
                self.on_bytes(nbytes)

    def _populate_range(self, batch: list[TensorProgress]) -> None:
        """Make the arena pages a batch of whole tensors lands in, in one call (and the arena, if first)."""
        offsets = self._arena_offsets
        spans = [(offsets[p.index], offsets[p.index] + p.info.nbytes) for p in batch if p.index in offsets]
        if spans:
            start, end = min(s for s, _ in spans), max(e for _, e in spans)
            populate(arena_view(self._ensure_arena(), start, end - start))

    def _ensure_arena(self) -> mmap.mmap:
        if self._arena is None:
            self._arena = allocate_arena(self._arena_bytes)
            self._arena_array = np.frombuffer(self._arena, dtype=np.uint8)
        return self._arena

    def _check_header(self, progress: TensorProgress, header: pb.TensorHeader) -> None:
        info = progress.info
        if (header.name, header.dtype, list(header.shape), header.nbytes) != (
            info.name,
            info.dtype,
            list(info.shape),
            info.nbytes,
        ):
            raise IntegrityError(f"tensor {info.name!r}: header disagrees with the manifest")

    def _destination(self, info: pb.TensorInfo) -> torch.Tensor | None:
        """The caller's tensor to write into (load_into), when it fits exactly."""
        dest = self.destinations.get(info.name)
        if (
            dest is not None
            and dest.device == self.device
            and dest.dtype == wire.torch_dtype(info.dtype)
            and tuple(dest.shape) == tuple(info.shape)
            and dest.is_contiguous()
        ):
            return dest
        return None

    def _allocate(self, info: pb.TensorInfo, index: int = -1, fresh: bool = True) -> torch.Tensor:
        """The tensor `info` is written into: the caller's, a view of the arena, or a new one.

        `fresh`: the arena pages are not made yet (populate them); False for a tensor
        whose bytes were written into the arena already (packed).
        """
        dest = self._destination(info)
        if dest is not None:
            return dest  # write straight into the caller's tensor (load_into)
        dtype = wire.torch_dtype(info.dtype)
        offset = self._arena_offsets.get(index)
        if offset is None:
            return torch.empty(tuple(info.shape), dtype=dtype, device=self.device)
        shape = tuple(info.shape)
        view = torch.frombuffer(self._ensure_arena(), dtype=dtype, count=info.nbytes // dtype.itemsize, offset=offset)
        if fresh:
            populate(view)  # this tensor's pages in one call, as its first chunk arrives
        return view if len(shape) == 1 else view.view(shape)

    def _write(self, progress: TensorProgress, offset: int, data: memoryview) -> None:
        if not len(data):
            return
        if progress.flat is not None:
            progress.flat[offset : offset + len(data)] = np.frombuffer(data, dtype=np.uint8)
        else:
            assert self._writer is not None and progress.tensor is not None
            self._writer.write(progress.tensor.reshape(-1).view(torch.uint8), offset, data)

    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The finished tensors, by name, in manifest order."""
        if self._writer is not None:
            self._writer.finish()
        out: dict[str, torch.Tensor] = {}
        converted = set()
        with gc_paused():  # the tensors packed chunks wrote are made here, thousands at once
            for progress in self.pending:
                tensor = progress.tensor
                if tensor is None:  # an empty tensor, or one a packed chunk wrote into the arena
                    tensor = progress.tensor = self._allocate(progress.info, progress.index, fresh=False)
                if dtype is not None and tensor.dtype != dtype and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                    converted.add(progress.index)
                out[progress.info.name] = tensor
        if converted:  # one arena view left would keep the converted tensors' old bytes alive too
            for progress in self.pending:
                if progress.index in self._arena_offsets and progress.index not in converted:
                    out[progress.info.name] = out[progress.info.name].clone()
        return out
