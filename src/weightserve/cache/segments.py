"""Shared-memory segments: a model's bytes in sealed memfds, handed to clients on the same host.

A segment is filled with `sendfile` from the checkpoint file (one copy, in the kernel)
or, for pieces a file cannot send whole (strided rows, padding), with `pwrite` from a
buffer; never through a writable shared mapping, so it can then be sealed
against writing, shrinking and growing, so a client that maps it can neither be killed
by SIGBUS nor see its bytes change. Segments are cache entries: counted in the memory
budget, shared by every client and rank that needs the same bytes, and reference-counted
by leases; one nobody leases is kept while the budget has room and dropped first when it
has not (with no budget, when its last lease ends).

What a segment holds: a served tensor that is one contiguous range of one checkpoint
tensor (unsliced, or a dim-0 slice for a rank) is a range of that whole tensor's
segment, so all ranks share one copy; anything else (a dim-1 slice, a fused or padded
tensor) gets a segment of its own bytes, built once for every client that asks.

Small tensors share segments, so a checkpoint of 10,000 norms and biases is a few
descriptors, not 10,000 (each is a file descriptor in both processes, a mapping and a
build): checkpoint tensors under SMALL_TENSOR bytes that lie next to each other in a
file form one block segment of up to BLOCK_BYTES (`RecordIndex`), and small tensors
with segments of their own bytes are packed together per grant (`pack_small`).
"""

from __future__ import annotations

import bisect
import fcntl
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from weightserve.loaders.base import TensorRecord
from weightserve.loaders.pieces import ZEROS, Piece, read_range
from weightserve.loaders.sources import Source

logger = logging.getLogger(__name__)

SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
"""Every seal a segment carries; a client refuses a descriptor missing any of the first three."""

FILL_BLOCK = 8 << 20
"""Bytes read and written per step while filling a segment."""

SMALL_TENSOR = 1 << 20
"""Tensors below this share segments with their neighbours; larger ones keep their own."""

BLOCK_BYTES = 16 << 20
"""Most bytes of small tensors one shared segment holds."""

BLOCK_GAP = 64 << 10
"""Most bytes between two small checkpoint tensors for them to share a block (format padding)."""

ALIGN = 64
"""Byte alignment kept for tensors in a shared segment (a block keeps the file's own, mod ALIGN)."""

_fill_buffers = threading.local()

SegmentKey = tuple[object, ...]


@dataclass(frozen=True)
class SegmentSpec:
    """What a segment holds: the bytes of `pieces` laid end to end."""

    key: SegmentKey
    pieces: tuple[Piece, ...]

    @property
    def size(self) -> int:
        return sum(p.nbytes for p in self.pieces)


@dataclass(frozen=True)
class Placement:
    """Where one served tensor lies: bytes [offset, offset + nbytes) of a segment."""

    spec: SegmentSpec
    offset: int


@dataclass
class Segment:
    """A sealed memfd and who leases it."""

    key: SegmentKey
    size: int
    fd: int
    leases: int = 0
    last_used: float = field(default_factory=time.monotonic)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class RecordIndex:
    """The checkpoint's tensors by source and byte range, to find the segment a range lies in."""

    def __init__(self, records: Sequence[TensorRecord]) -> None:
        self._by_source: dict[int, tuple[list[int], list[TensorRecord]]] = {}
        self._blocks: dict[tuple[int, int, int], Piece] = {}  # (source, offset, nbytes) of a record -> its block
        # at one offset the largest record comes last, so `containing` finds it for any range from there
        ordered = sorted((r for r in records if r.nbytes), key=lambda r: (r.source, r.offset, r.nbytes))
        for record in ordered:
            starts, found = self._by_source.setdefault(record.source, ([], []))
            starts.append(record.offset)
            found.append(record)
        for found in (f for _, f in self._by_source.values()):
            self._group_small(found)

    def _group_small(self, records: list[TensorRecord]) -> None:
        """Runs of small records close together in one file, each run cut at BLOCK_BYTES, become blocks."""
        run: list[TensorRecord] = []
        end = 0  # where the run's bytes end (records may overlap: views in a pickle)

        def close() -> None:
            if len(run) > 1:
                start = run[0].offset - run[0].offset % ALIGN  # the file's alignment, kept in the segment
                block = Piece(run[0].source, start, end - start)
                for member in run:
                    self._blocks[(member.source, member.offset, member.nbytes)] = block
            run.clear()

        for record in records:
            if record.nbytes >= SMALL_TENSOR:
                close()
                continue
            if run and (record.offset - end > BLOCK_GAP or record.offset + record.nbytes - run[0].offset > BLOCK_BYTES):
                close()
            end = max(end, record.offset + record.nbytes) if run else record.offset + record.nbytes
            run.append(record)
        close()

    def containing(self, source: int, offset: int, nbytes: int) -> TensorRecord | None:
        """The record whose bytes include [offset, offset + nbytes) of `source`, if one does."""
        starts, found = self._by_source.get(source, ([], []))
        i = bisect.bisect_right(starts, offset) - 1
        if i < 0:
            return None
        record = found[i]
        return record if offset + nbytes <= record.offset + record.nbytes else None

    def segment_of(self, record: TensorRecord) -> Piece:
        """The file range a record's segment holds: its small-tensor block, or the record alone."""
        whole = Piece(record.source, record.offset, record.nbytes)
        return self._blocks.get((record.source, record.offset, record.nbytes), whole)


def placement_of(pieces: tuple[Piece, ...], index: RecordIndex) -> Placement:
    """The segment a served tensor reads from, and where in it the tensor starts."""
    if len(pieces) == 1 and pieces[0].rows == 1 and pieces[0].source >= 0:
        piece = pieces[0]
        record = index.containing(piece.source, piece.offset, piece.nbytes)
        if record is not None:  # a whole tensor, or a dim-0 slice of one: a range of the whole (or its block)
            whole = index.segment_of(record)
            return Placement(SegmentSpec(("record", whole.source, whole.offset, whole.nbytes), (whole,)),
                             piece.offset - whole.offset)  # fmt: skip
    return Placement(SegmentSpec(("pieces", pieces), pieces), 0)


def pack_small(placements: Sequence[Placement]) -> list[Placement]:
    """The placements with runs of small own-bytes segments packed into shared ones, in order.

    Each member starts ALIGN-aligned in its pack (zeros between); a pack holds at most
    BLOCK_BYTES, and its key names every member, so the same request builds it once.
    """
    out: list[Placement] = []
    run: list[tuple[int, Placement]] = []

    def close() -> None:
        if len(run) == 1:
            out[run[0][0]] = run[0][1]
        elif run:
            pieces: list[Piece] = []
            starts = []
            at = 0
            for _, member in run:
                pad = -at % ALIGN
                if pad:
                    pieces.append(Piece(ZEROS, 0, pad))
                    at += pad
                starts.append(at)
                pieces.extend(member.spec.pieces)
                at += member.spec.size
            packed = tuple(pieces)
            spec = SegmentSpec(("pack", packed), packed)
            for (position, _), start in zip(run, starts, strict=True):
                out[position] = Placement(spec, start)
        run.clear()

    size = 0
    for placement in placements:
        out.append(placement)
        own = placement.spec.key[0] == "pieces"
        if not own or placement.spec.size >= SMALL_TENSOR:
            close()
            continue
        if run and size + placement.spec.size + ALIGN > BLOCK_BYTES:
            close()
        if not run:
            size = 0
        run.append((len(out) - 1, placement))
        size += placement.spec.size + ALIGN
    close()
    return out


def build_segment(spec: SegmentSpec, sources: Sequence[Source], label: str) -> Segment:
    """Fill a new memfd with the spec's bytes and seal it (runs on the read pool).

    Raises:
        CorruptCheckpointError: a file was truncated or changed while read.
        OSError: the system could not make the memfd (out of memory, no memfd support).
    """
    size = spec.size
    fd = os.memfd_create(f"weightserve:{label}"[:240], os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        at = 0
        for piece in spec.pieces:
            if not _send(piece, sources, fd, at):
                _write(Plan((piece,)), sources, fd, at)
            at += piece.nbytes
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return Segment(spec.key, size, fd)


@dataclass(frozen=True)
class Plan:
    """Pieces to read with read_range."""

    pieces: tuple[Piece, ...]


def _send(piece: Piece, sources: Sequence[Source], fd: int, at: int) -> bool:
    """A contiguous piece of a file copied in the kernel; False for anything else (rows, zeros, memory)."""
    if piece.rows != 1 or piece.source < 0 or not piece.nbytes:
        return False
    return sources[piece.source].send_to(fd, at, piece.offset, piece.nbytes)


def _write(plan: Plan, sources: Sequence[Source], fd: int, at: int) -> None:
    """The plan's bytes read into a buffer and pwritten at `at`, FILL_BLOCK at a time."""
    buf = _fill_buffer()
    size = sum(p.nbytes for p in plan.pieces)
    done = 0
    while done < size:
        view = memoryview(buf)[: min(FILL_BLOCK, size - done)]
        read_range(plan, sources, done, view)
        written = 0
        while written < len(view):
            written += os.pwrite(fd, view[written:], at + done + written)
        done += len(view)


def _fill_buffer() -> bytearray:
    buf: bytearray | None = getattr(_fill_buffers, "buf", None)
    if buf is None:
        buf = _fill_buffers.buf = bytearray(FILL_BLOCK)
    return buf


@dataclass
class SegmentSet:
    """One model entry's segments: built once, leased, dropped when idle and the budget needs it."""

    segments: dict[SegmentKey, Segment] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(s.size for s in self.segments.values())

    @property
    def leased(self) -> int:
        return sum(1 for s in self.segments.values() if s.leases)

    def get(self, key: SegmentKey) -> Segment | None:
        return self.segments.get(key)

    def add(self, segment: Segment) -> Segment:
        """Keep a new segment (or the one another request built first); returns the one kept."""
        kept = self.segments.setdefault(segment.key, segment)
        if kept is not segment:
            segment.close()
        return kept

    def lease(self, segments: Sequence[Segment]) -> None:
        for segment in segments:
            segment.leases += 1
            segment.last_used = time.monotonic()

    def release(self, segments: Sequence[Segment], keep_idle: bool) -> int:
        """End one lease of each; close those nobody leases unless `keep_idle`. Returns bytes freed."""
        freed = 0
        for segment in segments:
            segment.leases -= 1
            segment.last_used = time.monotonic()
            if segment.leases == 0 and not keep_idle:
                freed += self._drop(segment)
        return freed

    def drop_idle(self, older_than: float = 0.0) -> int:
        """Close every segment no lease holds (unused for `older_than` seconds); return the bytes freed."""
        cutoff = time.monotonic() - older_than
        return sum(self._drop(s) for s in list(self.segments.values()) if s.leases == 0 and s.last_used <= cutoff)

    def _drop(self, segment: Segment) -> int:
        if self.segments.get(segment.key) is segment:
            del self.segments[segment.key]
        segment.close()
        return segment.size
