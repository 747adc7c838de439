"""Receiving a rank's tensors as shared-memory segments from a server on the same host.

FetchShardSegments answers with the segment table and a one-time ticket; `redeem`
trades the ticket for the segments' descriptors on the server's side socket (the
connection it leaves open is the lease: the server keeps the segments counted until it
closes). Each descriptor must carry the write, shrink and grow seals before it is
mapped, so no one can change or truncate the bytes under the tensors; segments are
mapped MAP_PRIVATE, so writing into a tensor copies that page instead of faulting.

Tensors are views of the mappings (nothing is copied) unless `copy=True`, which copies
each once into its own storage and ends the lease at once. Views end the lease when the
last of them is garbage-collected. `verify=True` checks every tensor's crc32c.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import fcntl
import mmap
import os
import socket
import struct
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch

from weightserve import wire
from weightserve.client.assembly import FetchStats, allocate_arena, arena_view, populate_range
from weightserve.client.common import FetchArgs
from weightserve.client.gc_pause import gc_paused
from weightserve.client.manifest_pages import check_entry, check_unique_names
from weightserve.client.placements import Run, manifest_names, names_of, runs_of
from weightserve.errors import FetchError, RedeemError
from weightserve.v1 import weightserve_pb2 as pb

MAGIC = b"WSFD1"
BATCH_HEADER = struct.Struct("!2sII")
MAX_FDS_PER_MESSAGE = 250
REQUIRED_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
MADV_POPULATE_READ = 22
"""Linux 5.14+: map every page of a range for reading in one call (no copy-on-write break)."""
COPY_BLOCK = 64 << 20


class Lease:
    """The side-socket connection that keeps a grant's segments counted on the server; closes once."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock: socket.socket | None = sock
        self.holders = 0

    def hold(self) -> None:
        self.holders += 1

    def drop(self) -> None:
        self.holders -= 1
        if self.holders <= 0:
            self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


REDEEM_SECONDS = 10.0
"""Longest wait for the side socket to hand over a grant's descriptors (or the call's timeout, if shorter).

The segments exist before the ticket is issued, so a live server answers in
milliseconds; a wait past this means the side socket is stuck (its accept loop ended,
its backlog full), and waiting out the call's whole timeout (60 s by default) before
streaming chunks instead would only delay the fetch.
"""


def redeem(path: str, ticket: bytes, count: int, timeout: float) -> tuple[Lease, list[int]]:
    """The `count` descriptors a ticket grants, and the lease connection that holds them.

    Waits at most `timeout` seconds (capped at REDEEM_SECONDS) for each step.

    Raises:
        RedeemError: UNAVAILABLE when the side socket cannot be reached or drops the
            connection; DEADLINE_EXCEEDED when it does not answer in time;
            FAILED_PRECONDITION when the server refuses the ticket (used, expired, or it is
            busy) or sends the wrong number; RESOURCE_EXHAUSTED when descriptors were cut off.
    """
    fds: list[int] = []
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    except OSError as e:
        raise RedeemError(f"shared memory: no socket for {path}: {e}", grpc.StatusCode.RESOURCE_EXHAUSTED) from None
    sock.settimeout(min(timeout, REDEEM_SECONDS))
    try:
        try:
            sock.connect(path)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused before it read the ticket:
                sock.sendall(MAGIC + ticket)  # its reason waits to be read below
            while True:  # a grant of no segments is one message of none
                fds += _receive_batch(sock, count)
                if len(fds) >= count:
                    break
        except TimeoutError:
            raise RedeemError(
                f"shared memory: {path} did not hand over the segments within {sock.gettimeout():g} s",
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ) from None
        except OSError as e:
            raise RedeemError(f"shared memory: cannot reach {path}: {e}", grpc.StatusCode.UNAVAILABLE) from None
        return Lease(sock), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        sock.close()
        raise


def _receive_batch(sock: socket.socket, count: int) -> list[int]:
    """One message of the server's: the descriptors it carries (checked), or a RedeemError for a refusal."""
    try:
        message, received, flags, _ = socket.recv_fds(sock, 4096, MAX_FDS_PER_MESSAGE)
    except ConnectionResetError:  # closed with our ticket unread: the kernel says so before the refusal it queued
        message, received, flags, _ = socket.recv_fds(sock, 4096, MAX_FDS_PER_MESSAGE)
    try:
        if flags & socket.MSG_CTRUNC:
            raise RedeemError("shared memory: descriptors were cut off (open files limit?)",
                              grpc.StatusCode.RESOURCE_EXHAUSTED)  # fmt: skip
        if not message:
            raise RedeemError("shared memory: the side socket closed without an answer", grpc.StatusCode.UNAVAILABLE)
        if not message.startswith(b"OK"):
            reason = message[2:].decode(errors="replace") if message.startswith(b"ER") else "no answer"
            raise RedeemError(f"shared memory: {reason}", grpc.StatusCode.FAILED_PRECONDITION)
        _, batch, total = BATCH_HEADER.unpack(message[: BATCH_HEADER.size])
        if total != count or batch != len(received):
            raise RedeemError(f"shared memory: {total} descriptors offered for {count} segments",
                              grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip
    except BaseException:
        for fd in received:
            os.close(fd)
        raise
    return received


@dataclass
class Mapped:
    """One segment mapped into this process."""

    view: memoryview


def map_segments(fds: Sequence[int], sizes: Sequence[int], lease: Lease) -> list[Mapped]:
    """Check each descriptor's seals and size, map it MAP_PRIVATE, and close the descriptor.

    Raises:
        FetchError: DATA_LOSS when a segment is not sealed or not its stated size.
    """
    mapped: list[Mapped] = []
    try:
        for fd, size in zip(fds, sizes, strict=True):
            check_sealed(fd, size)
            region = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            view = memoryview(region)
            lease.hold()
            weakref.finalize(view, lease.drop)  # the lease ends with the last tensor viewing a segment
            mapped.append(Mapped(view))
    finally:
        for fd in fds:
            os.close(fd)
    return mapped


def check_sealed(fd: int, size: int) -> None:
    """A segment's descriptor carries the write, shrink and grow seals and is `size` bytes.

    Raises:
        FetchError: DATA_LOSS when it does not (its bytes could change, or a truncation kill a reader).
    """
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    if seals & REQUIRED_SEALS != REQUIRED_SEALS:
        raise FetchError(f"shared memory: a segment lacks its seals ({seals:#x})", grpc.StatusCode.DATA_LOSS)
    if os.fstat(fd).st_size != size:
        raise FetchError(f"shared memory: a segment is not {size} bytes", grpc.StatusCode.DATA_LOSS)


POPULATE_PIECE = 8 << 20
"""Most bytes one populate call maps: a large segment is shared out among the threads in pieces."""


@contextlib.contextmanager
def populating(mapped: Sequence[Mapped], runs: Sequence[Run]) -> Iterator[None]:
    """Map the pages the runs lie in, read-only, on background threads while the block runs; all done on exit.

    Only the runs' bytes: a rank's dim-0 slice is a range of a segment that every rank
    maps whole, and populating whole segments had 8 ranks map 8 times the model (each
    rank's fetch took 110-125 ms instead of ~15). One madvise(MADV_POPULATE_READ) per
    POPULATE_PIECE (ctypes lets go of the GIL), rather than a page fault per 4 KiB on
    first use: 1 GiB took ~30 ms on two threads against ~50 ms on one. The calling
    thread is one of the COPY_THREADS: it makes the views meanwhile and then takes the
    pieces still left, so the views never wait for a core the populate threads hold
    (10,000 small tensors took ~30% longer with a populate thread per core). Read-only,
    so no copy-on-write page is made. A no-op before Linux 5.14: the pages then fault in
    on first use. The threads are joined even when the block raises, so no call
    outlives the mappings.
    """
    pieces = collections.deque(piece for start, end in _run_ranges(mapped, runs) for piece in _pieces(start, end))
    helpers = [
        threading.Thread(target=_populate_pieces, args=(pieces,), name="weightserve-populate", daemon=True)
        for _ in range(min(COPY_THREADS - 1, len(pieces)))
    ]
    for helper in helpers:
        helper.start()
    try:
        yield
    except BaseException:
        pieces.clear()  # nothing will read the pages: stop at the pieces in hand
        raise
    finally:
        _populate_pieces(pieces)
        for helper in helpers:
            helper.join()


def _populate_pieces(pieces: collections.deque[tuple[int, int]]) -> None:
    """Populate pieces until none is left (several threads share the deque)."""
    while True:
        try:
            address, nbytes = pieces.popleft()
        except IndexError:
            return
        populate_range(address, nbytes, MADV_POPULATE_READ)


def _run_ranges(mapped: Sequence[Mapped], runs: Sequence[Run]) -> list[tuple[int, int]]:
    """The address ranges the runs lie in, those that touch or overlap merged (runs outside their segment left out)."""
    spans: list[tuple[int, int]] = []
    bases: dict[int, int] = {}
    for run in runs:
        if run.segment >= len(mapped) or run.end > len(mapped[run.segment].view) or run.end <= run.offset:
            continue  # tensor_views refuses it
        base = bases.get(run.segment)
        if base is None:
            anchor = ctypes.c_char.from_buffer(mapped[run.segment].view)  # MAP_PRIVATE mappings are writable
            base = bases[run.segment] = ctypes.addressof(anchor)
            del anchor
        spans.append((base + run.offset, base + run.end))
    spans.sort()
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _pieces(start: int, end: int) -> list[tuple[int, int]]:
    return [(at, min(POPULATE_PIECE, end - at)) for at in range(start, end, POPULATE_PIECE)]


def tensor_views(
    manifest: pb.GetManifestResponse,
    all_names: Sequence[str],
    runs: Sequence[Run],
    mapped: Sequence[Mapped],
    names: set[str] | None,
    model: str = "",
) -> dict[str, torch.Tensor]:
    """The granted tensors as views of their segments, in manifest order (empty tensors allocated).

    Each segment is viewed once per dtype, and each run is one strided view split with
    `unbind`, so a tensor costs about a microsecond, not the ~5 of a view of its own.
    Views share their segment's storage; `copy=True` gives each its own.

    Raises:
        FetchError: DATA_LOSS when a run lies outside its segment, or the manifest names
            a tensor twice (or not at all).
    """
    views = _SegmentViews(mapped)
    tensors: list[torch.Tensor] = []  # in manifest order
    placed_names: list[str] = []
    for run, run_names in zip(runs, names_of(all_names, runs), strict=True):
        tensors += views.run(run, run_names[0])
        placed_names += run_names
    by_name = dict(zip(placed_names, tensors, strict=True))
    if names is None and len(by_name) == len(manifest.tensors) and "" not in by_name:
        return by_name  # every tensor placed (runs are in manifest order), by a name of its own
    check_unique_names(all_names, model)
    placed = dict(zip((i for run in runs for i in run.indices), tensors, strict=True))
    return _in_manifest_order(manifest.tensors, placed, names, model)


def _in_manifest_order(
    infos: Sequence[pb.TensorInfo], placed: dict[int, torch.Tensor], names: set[str] | None, model: str
) -> dict[str, torch.Tensor]:
    """The wanted tensors by name in manifest order, an empty tensor allocated for each of 0 bytes.

    Raises:
        FetchError: DATA_LOSS naming the first wanted tensor with bytes but no placement.
    """
    out: dict[str, torch.Tensor] = {}
    for index, info in enumerate(infos):
        if names is not None and info.name not in names:
            continue
        tensor = placed.get(index)
        if tensor is None:
            if info.nbytes:
                raise FetchError(f"shared memory: no segment holds {info.name!r}", grpc.StatusCode.DATA_LOSS)
            check_entry(info, model)  # 0 bytes: a shape torch can make empty
            tensor = torch.empty(tuple(info.shape), dtype=wire.torch_dtype(info.dtype))
        out[info.name] = tensor
    return out


class _SegmentViews:
    """Typed views of mapped segments, made once per (segment, dtype)."""

    def __init__(self, mapped: Sequence[Mapped]) -> None:
        self.mapped = mapped
        self._typed: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def run(self, run: Run, first: str) -> Sequence[torch.Tensor]:
        """The run's tensors as views of its segment (`first` names it in errors)."""
        if run.segment >= len(self.mapped):
            raise FetchError(f"shared memory: {first!r} is placed in no segment", grpc.StatusCode.DATA_LOSS)
        region = self.mapped[run.segment].view
        if run.end > len(region):
            raise FetchError(f"shared memory: {first!r} lies outside its segment", grpc.StatusCode.DATA_LOSS)
        dtype, shape, count, start = run.dtype, run.shape, len(run.indices), run.offset
        size = dtype.itemsize
        if start % size:  # not aligned for its dtype (a packed file): a view of its own each
            return [torch.frombuffer(region, dtype=torch.uint8, count=run.nbytes, offset=start + i * run.nbytes)
                    .view(dtype).reshape(shape) for i in range(count)]  # fmt: skip
        typed = self._typed.get((run.segment, dtype))
        if typed is None:
            whole = torch.frombuffer(region, dtype=torch.uint8)
            typed = self._typed[(run.segment, dtype)] = whole[: len(whole) - len(whole) % size].view(dtype)
        numel = run.nbytes // size
        strides = _contiguous_strides(shape)
        if count == 1:
            return [typed.as_strided(shape, strides, start // size)]
        return typed.as_strided((count, *shape), (numel, *strides), start // size).unbind(0)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    step = 1
    for dim in reversed(shape):
        strides.append(step)
        step *= max(dim, 1)
    return tuple(reversed(strides))


def verify(runs: Sequence[Run], manifest: pb.GetManifestResponse, tensors: dict[str, torch.Tensor]) -> None:
    """Check each tensor's crc32c against the grant's, and its dtype and shape against the manifest's.

    Raises:
        FetchError: DATA_LOSS naming the first tensor that does not match.
    """
    infos = manifest.tensors
    for run in runs:
        for index, crc in zip(run.indices, run.crcs, strict=True):
            info = infos[index]
            tensor = tensors.get(info.name)
            if tensor is None:
                continue
            if tensor.dtype != wire.torch_dtype(info.dtype) or tuple(tensor.shape) != tuple(info.shape):
                raise FetchError(f"shared memory: {info.name!r} is not placed as its manifest says",
                                 grpc.StatusCode.DATA_LOSS)  # fmt: skip
            data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
            if wire.crc32c(data) != crc:
                raise FetchError(f"shared memory: tensor {info.name!r} failed its crc32c", grpc.StatusCode.DATA_LOSS)


def copied(
    tensors: dict[str, torch.Tensor], device: torch.device, into: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Each tensor copied once onto `device` (a GPU; the CPU reads with `read_copies`), or into `into[name]`.

    To a GPU the bytes go through a small ring of pinned buffers on a side stream, so
    host memory beyond the mappings stays at the ring's size and copies overlap.
    """
    ring = _PinnedRing(device) if device.type == "cuda" else None
    out = {}
    for name, view in tensors.items():
        dest = (
            into[name]
            if _fits(into.get(name), view, device)
            else torch.empty(view.shape, dtype=view.dtype, device=device)
        )
        if ring is not None:
            ring.copy(view, dest)
        else:
            dest.copy_(view)
        out[name] = dest
    if ring is not None:
        ring.finish()
    return out


@dataclass(frozen=True)
class _Read:
    """Bytes [offset, offset + nbytes) of a segment's descriptor, to land at `address`."""

    fd: int
    offset: int
    address: int
    nbytes: int


COPY_THREADS = min(4, os.cpu_count() or 1)
"""Threads copy=True reads on, and views populate on (the kernel does the work of each, without the GIL)."""
READ_BLOCK = 32 << 20
"""Most bytes one read copies: a large tensor is read by several threads."""


def read_copies(
    fds: Sequence[int],
    sizes: Sequence[int],
    manifest: pb.GetManifestResponse,
    all_names: Sequence[str],
    runs: Sequence[Run],
    names: set[str] | None,
    into: dict[str, torch.Tensor],
    model: str = "",
) -> dict[str, torch.Tensor]:
    """copy=True on the CPU: each tensor read from its segment's descriptor straight into storage of its own.

    Nothing is mapped: `preadv` on COPY_THREADS threads has the kernel copy each range
    into its destination (made with MADV_POPULATE_WRITE first), so the bytes are copied
    once, no page of the segments is ever mapped here, and there is nothing to unmap
    after. On 2 cores this was 1.2x mapping the segments and copying with torch.

    Raises:
        FetchError: DATA_LOSS when a segment is not sealed or not its size, a placement
            lies outside its segment, or a wanted tensor has none.
    """
    for fd, size in zip(fds, sizes, strict=True):
        check_sealed(fd, size)
    wanted: list[tuple[int, str, Run, int]] = []  # manifest index, name, run, offset in the segment
    for run, run_names in zip(runs, names_of(all_names, runs), strict=True):
        if run.segment >= len(fds) or run.end > sizes[run.segment]:
            raise FetchError(f"shared memory: {run_names[0]!r} lies outside its segment", grpc.StatusCode.DATA_LOSS)
        for n, (index, name) in enumerate(zip(run.indices, run_names, strict=True)):
            if names is None or name in names:
                wanted.append((index, name, run, run.offset + n * run.nbytes))
    fits = {name for _, name, run, _ in wanted if _fits_run(into.get(name), run)}
    arena = Arena([run.nbytes for _, name, run, _ in wanted if name not in fits])
    placed: dict[int, torch.Tensor] = {}
    reads: list[_Read] = []
    for index, name, run, offset in wanted:
        dest = into[name] if name in fits else arena.take(run.dtype, run.shape, run.nbytes)
        placed[index] = dest
        _plan_reads(reads, _Read(fds[run.segment], offset, dest.data_ptr(), run.nbytes))
    with ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="weightserve-copy") as pool:
        for _ in pool.map(_read, reads):
            pass
    return _in_manifest_order(manifest.tensors, placed, names, model)


def _plan_reads(reads: list[_Read], read: _Read) -> None:
    """Add a tensor's read: joined to the last one where both ranges continue it, cut into READ_BLOCKs."""
    if not read.nbytes:
        return
    last = reads[-1] if reads else None
    if (
        last is not None
        and last.fd == read.fd
        and last.offset + last.nbytes == read.offset
        and last.address + last.nbytes == read.address
        and last.nbytes + read.nbytes <= READ_BLOCK
    ):
        reads[-1] = _Read(last.fd, last.offset, last.address, last.nbytes + read.nbytes)
        return
    for start in range(0, read.nbytes, READ_BLOCK):
        n = min(READ_BLOCK, read.nbytes - start)
        reads.append(_Read(read.fd, read.offset + start, read.address + start, n))


def _read(read: _Read) -> None:
    """One read, on a copy thread: make the destination's pages, then have the kernel fill them."""
    populate_range(read.address, read.nbytes)
    done = 0
    while done < read.nbytes:
        target = (ctypes.c_char * (read.nbytes - done)).from_address(read.address + done)
        got = os.preadv(read.fd, [target], read.offset + done)
        if got <= 0:
            raise FetchError("shared memory: a segment ended before its stated size", grpc.StatusCode.DATA_LOSS)
        done += got


def _fits_run(dest: torch.Tensor | None, run: Run) -> bool:
    return (
        dest is not None
        and dest.device.type == "cpu"
        and dest.dtype == run.dtype
        and tuple(dest.shape) == run.shape
        and dest.is_contiguous()
    )


def _fits(dest: torch.Tensor | None, view: torch.Tensor, device: torch.device) -> bool:
    return (
        dest is not None
        and dest.shape == view.shape
        and dest.dtype == view.dtype
        and dest.device == device
        and dest.is_contiguous()
    )


class Arena:
    """One private anonymous mapping for a fetch's copied tensors (assembly's, as on the gRPC path).

    Each tensor gets a storage of its own bytes, ALIGN-aligned, so saving one saves
    only it; its pages are made by the read that fills it (`read_copies`).
    """

    ALIGN = 64

    def __init__(self, sizes: Sequence[int]) -> None:
        self.region = allocate_arena(sum(-(-n // self.ALIGN) * self.ALIGN for n in sizes))
        self.used = 0

    def take(self, dtype: torch.dtype, shape: tuple[int, ...], nbytes: int) -> torch.Tensor:
        """A tensor of the next `nbytes` (one of the sizes the arena was made for)."""
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        at = -(-self.used // self.ALIGN) * self.ALIGN
        if at + nbytes > len(self.region):
            raise ValueError(f"arena of {len(self.region)} bytes has no room for {nbytes} more")
        self.used = at + nbytes
        return arena_view(self.region, at, nbytes).view(dtype).reshape(shape)


class _PinnedRing:
    """Host-to-device copies through RING pinned buffers of COPY_BLOCK bytes on a side stream."""

    RING = 4
    BLOCK = 16 << 20

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)
        self.buffers = [torch.empty(self.BLOCK, dtype=torch.uint8, pin_memory=True) for _ in range(self.RING)]
        self.done: list[torch.cuda.Event | None] = [None] * self.RING
        self.slot = 0

    def copy(self, view: torch.Tensor, dest: torch.Tensor) -> None:
        src = view.reshape(-1).view(torch.uint8)
        flat = dest.reshape(-1).view(torch.uint8)
        for start in range(0, src.numel(), self.BLOCK):
            n = min(self.BLOCK, src.numel() - start)
            slot, self.slot = self.slot, (self.slot + 1) % self.RING
            event = self.done[slot]
            if event is not None:
                event.synchronize()  # the copy that last used this buffer has finished
            staging = self.buffers[slot][:n]
            staging.copy_(src[start : start + n])
            with torch.cuda.stream(self.stream):
                flat[start : start + n].copy_(staging, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            self.done[slot] = event

    def finish(self) -> None:
        self.stream.synchronize()


def receive(
    fetch: FetchArgs,
    manifest: pb.GetManifestResponse,
    grant: pb.ShardSegments,
    stats: FetchStats,
    timeout: float,
    started: float,
    all_names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The state dict a grant describes: redeem, check, map, and view (or copy) every tensor.

    `all_names` is `manifest_names(manifest)` where the caller made it already (while
    the grant was on its way).

    Raises:
        RedeemError: the side socket refused the ticket, or could not be reached or did
            not answer in time (the fetch may stream chunks instead).
        FetchError: a segment is not sealed or not its size, or (with verify) a tensor
            failed its crc32c.
    """
    runs = runs_of(grant, manifest)  # checked before anything is redeemed or mapped
    if all_names is None:
        all_names = manifest_names(manifest)
    lease, fds = redeem(grant.handoff_socket, grant.ticket, len(grant.segments), timeout)
    names = set(fetch.names) if fetch.names else None
    sizes = [s.size for s in grant.segments]
    if fetch.device.type == "cpu" and (fetch.copy or fetch.destinations):
        try:
            stats.time_to_first_chunk = time.monotonic() - started
            check_unique_names(all_names, fetch.shard.model)
            state = read_copies(fds, sizes, manifest, all_names, runs, names, fetch.destinations or {},
                                fetch.shard.model)  # fmt: skip
        finally:
            for fd in fds:
                os.close(fd)
            lease.close()  # nothing maps the segments: the lease ends now
        if fetch.verify:
            verify(runs, manifest, state)
        return _finish(fetch, manifest, grant, stats, started, state)
    try:
        mapped = map_segments(fds, sizes, lease)
        stats.time_to_first_chunk = time.monotonic() - started
        with populating(mapped, runs):  # for a GPU too: the copies then read mapped pages, rather than fault on each
            with gc_paused():
                views = tensor_views(manifest, all_names, runs, mapped, names, fetch.shard.model)
            if fetch.verify:
                verify(runs, manifest, views)
        state = views if fetch.device.type == "cpu" else copied(views, fetch.device, fetch.destinations or {})
        del views, mapped
    finally:
        if lease.holders == 0:  # nothing views the segments (copied, or failed): end the lease now
            lease.close()
    return _finish(fetch, manifest, grant, stats, started, state)


def _finish(
    fetch: FetchArgs,
    manifest: pb.GetManifestResponse,
    grant: pb.ShardSegments,
    stats: FetchStats,
    started: float,
    state: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The state dict in the requested dtype, with the fetch's stats filled in."""
    if fetch.dtype is not None:
        dtype = fetch.dtype
        state = {k: v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v for k, v in state.items()}
    if fetch.names:
        stats.payload_bytes = sum(t.nbytes for t in state.values())
    else:  # every tensor of the plan: its total, without a pass over 10,000 tensors
        stats.payload_bytes = manifest.total_bytes
    stats.tensors = len(state)
    stats.attempts = 1
    stats.version = manifest.version
    stats.seconds = time.monotonic() - started
    return state
