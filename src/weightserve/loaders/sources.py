"""Byte sources a loader's tensor records point into.

A source is read with pread into caller-owned buffers, never mapped: a file that is
truncated under a mapping turns the next page touch into SIGBUS, which would kill the
server and every stream with it. A short read, or a file whose identity changed since
it was opened, raises CorruptCheckpointError, which costs only the stream that hit it.
The identity is (size, mtime, inode, ctime): a writer can set the mtime back, but not
the ctime, which the kernel moves on every write. Unlinking moves the ctime too, so a
file replaced by rename (the safe way to roll out a checkpoint) or deleted gets one
allowance: once no name links it, the same size, mtime and inode with a new ctime are
the old bytes still held by our descriptor, and that ctime becomes the one to keep.
A write after that moves the ctime again and is caught; a write with its mtime set
back, landing between the last check before the unlink and the first after it, is the
one case this trusts. A file still linked keeps the full identity, ctime included
(`rsync --inplace --times` rewrites in place and sets the mtime back).
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from weightserve.errors import CorruptCheckpointError
from weightserve.loaders.access import reading

SPAN_BYTES = 8 * 1024 * 1024
"""Largest page-cache span one strided gather copies at once (per read thread)."""

_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
_spans = threading.local()


def _span_buffer(size: int) -> bytearray:
    buf: bytearray | None = getattr(_spans, "buf", None)
    if buf is None or len(buf) < size:
        buf = _spans.buf = bytearray(max(size, 1))
    return buf


def file_identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What changes whenever a file's bytes do: (size, mtime, inode, ctime), in ns."""
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


class Source(ABC):
    """A read-only container of bytes (a file, or a tensor held in memory)."""

    label: str
    size: int
    bytes_read: int = 0

    @abstractmethod
    def read_into(self, offset: int, dest: memoryview, check: bool = True) -> None:
        """Fill `dest` with the bytes at [offset, offset + len(dest)).

        `check=False` skips the changed-file check, for a caller that reads many small
        runs and checks once after the last.

        Raises:
            CorruptCheckpointError: the bytes are not all there, or changed.
        """

    def read_rows(self, offset: int, row_bytes: int, stride: int, dest: memoryview) -> None:
        """Fill `dest` with len(dest) // row_bytes runs of `row_bytes`, `stride` apart."""
        for i, at in enumerate(range(0, len(dest), row_bytes)):
            self.read_into(offset + i * stride, dest[at : at + row_bytes], check=False)

    def send_to(self, out_fd: int, out_offset: int, offset: int, nbytes: int) -> bool:
        """Copy bytes to another descriptor inside the kernel; False where this source cannot."""
        return False

    def content_id(self) -> object:
        """Equal for two sources only when they hold the same bytes (this object, unless the source knows better)."""
        return id(self)

    def check_unchanged(self) -> None:  # noqa: B027 - only files can change underneath
        """Raise if the bytes behind the source changed since it was opened."""

    def close(self) -> None:  # noqa: B027 - sources with nothing to release keep this
        """Release what the source holds."""


class FileSource(Source):
    """A file read with os.preadv; safe to share between threads.

    Errors name the file by its base name only: they reach clients, who have no
    business learning the server's directory layout. A file the server may not open
    is a PreconditionError (loaders/access.py).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.label = path.name
        with reading(path):
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        st = os.fstat(self._fd)
        self.size = st.st_size
        self._identity = file_identity(st)
        self._checked = self._identity
        """The identity checks compare with: the opening one, or its ctime after the file was unlinked."""
        self._unlinked_lock = threading.Lock()
        self.bytes_read = 0

    def read_into(self, offset: int, dest: memoryview, check: bool = True) -> None:
        want = len(dest)
        if offset < 0 or offset + want > self.size:
            raise CorruptCheckpointError(
                f"{self.label}: read of [{offset}, {offset + want}) is past the end ({self.size} bytes)"
            )
        done = 0
        while done < want:
            n = os.preadv(self._fd, [dest[done:]], offset + done)
            if n <= 0:
                raise CorruptCheckpointError(
                    f"{self.label}: file ends at {offset + done}, expected {offset + want} bytes; "
                    "it was truncated while being served"
                )
            done += n
        self.bytes_read += want
        if check:
            self.check_unchanged()

    def read_rows(self, offset: int, row_bytes: int, stride: int, dest: memoryview) -> None:
        """Strided gather of whole rows (a tensor-parallel slice along a later dim).

        Rows whose span is already in the page cache are copied out of it with one
        RWF_NOWAIT read per group of rows and gathered in memory: a syscall per row
        costs more CPU than copying the span, and NOWAIT guarantees the wider span
        causes no storage I/O. Rows not cached are read one by one, so storage only
        ever serves the rank's own bytes, which is what `bytes_read` counts.
        """
        rows = len(dest) // row_bytes
        last = offset + (rows - 1) * stride + row_bytes
        if offset < 0 or last > self.size:
            raise CorruptCheckpointError(f"{self.label}: rows up to {last} are past the end ({self.size} bytes)")
        group = max(1, SPAN_BYTES // stride)
        for first in range(0, rows, group):
            count = min(group, rows - first)
            part = dest[first * row_bytes : (first + count) * row_bytes]
            at = offset + first * stride
            if not self._gather_cached(at, row_bytes, stride, part):
                self._read_rows_one_by_one(at, row_bytes, stride, part)
        self.bytes_read += rows * row_bytes

    def _gather_cached(self, offset: int, row_bytes: int, stride: int, dest: memoryview) -> bool:
        rows = len(dest) // row_bytes
        span = (rows - 1) * stride + row_bytes
        if not _NOWAIT or rows < 2:
            return False
        scratch = _span_buffer(rows * stride)
        try:
            got = os.preadv(self._fd, [memoryview(scratch)[:span]], offset, _NOWAIT)
        except (BlockingIOError, OSError):
            return False  # not (all) in the page cache, or the kernel lacks RWF_NOWAIT
        if got != span:
            return False
        table = np.frombuffer(scratch, dtype=np.uint8, count=rows * stride).reshape(rows, stride)
        np.frombuffer(dest, dtype=np.uint8).reshape(rows, row_bytes)[:] = table[:, :row_bytes]
        return True

    def _read_rows_one_by_one(self, offset: int, row_bytes: int, stride: int, dest: memoryview) -> None:
        fd, preadv = self._fd, os.preadv
        for i in range(len(dest) // row_bytes):
            part = dest[i * row_bytes : (i + 1) * row_bytes]
            if preadv(fd, [part], offset + i * stride) != row_bytes:
                self.read_into(offset + i * stride, part, check=False)  # short read: retry or raise
                self.bytes_read -= row_bytes  # counted once, by read_rows

    def content_id(self) -> object:
        """The file's path and identity: two sources of one unchanged file hold the same bytes."""
        return (str(self.path), self._identity)

    def send_to(self, out_fd: int, out_offset: int, offset: int, nbytes: int) -> bool:
        """sendfile() the range to `out_fd` at `out_offset`: one copy, in the kernel (a memfd fill)."""
        if offset < 0 or offset + nbytes > self.size:
            raise CorruptCheckpointError(
                f"{self.label}: read of [{offset}, {offset + nbytes}) is past the end ({self.size} bytes)"
            )
        os.lseek(out_fd, out_offset, os.SEEK_SET)
        done = 0
        while done < nbytes:
            n = os.sendfile(out_fd, self._fd, offset + done, nbytes - done)
            if n <= 0:
                raise CorruptCheckpointError(
                    f"{self.label}: file ends at {offset + done}, expected {offset + nbytes} bytes; "
                    "it was truncated while being served"
                )
            done += n
        self.bytes_read += nbytes
        self.check_unchanged()
        return True

    def check_unchanged(self) -> None:
        """Raise if the file was truncated or rewritten in place since it was opened.

        A file replaced by rename, or deleted, is not changed: the descriptor still reads
        its old bytes, so streams in flight finish with the revision they started on.
        """
        st = os.fstat(self._fd)
        now = file_identity(st)
        if now == self._checked:
            return
        with self._unlinked_lock:  # threads share the source: one of them adopts the unlinked ctime, once
            if now == self._checked:
                return
            if st.st_nlink == 0 and self._checked == self._identity and now[:3] == self._identity[:3]:
                self._checked = now
                return
            raise CorruptCheckpointError(
                f"{self.label}: file changed while being served "
                f"(size {self._identity[0]} -> {st.st_size}); fetch again to get the new revision"
            )

    def advise_willneed(self, offset: int, length: int) -> None:
        """Ask the kernel to start reading a range into the page cache."""
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class MemorySource(Source):
    """Bytes held in memory: tensors a loader had to materialise (legacy pickles)."""

    def __init__(self, label: str, data: Any) -> None:
        self.label = label
        self._array = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
        self.size = int(self._array.nbytes)
        self.bytes_read = 0

    def read_into(self, offset: int, dest: memoryview, check: bool = True) -> None:
        end = offset + len(dest)
        if offset < 0 or end > self.size:
            raise CorruptCheckpointError(f"{self.label}: read of [{offset}, {end}) past {self.size} bytes")
        np.frombuffer(dest, dtype=np.uint8)[:] = self._array[offset:end]
        self.bytes_read += len(dest)
