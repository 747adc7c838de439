"""Writing FetchFiles streams to disk: verified, atomic, never outside `dest`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import IO

import grpc

from weightserve import wire
from weightserve.errors import FetchError
from weightserve.v1 import weightserve_pb2 as pb


def atomic_write_path(path: Path) -> tuple[IO[bytes], Path]:
    """A temp file beside `path`, to be fsynced and renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    return os.fdopen(fd, "wb"), Path(tmp)


def commit(handle: IO[bytes], tmp: Path, path: Path) -> None:
    """fsync and rename: readers see the old file or the whole new one."""
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()
    os.replace(tmp, path)


class FileWriter:
    """Consumes FileChunks and writes each file atomically under `dest`."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest.resolve()
        self.written: list[Path] = []
        self._open: tuple[str, IO[bytes], Path, int] | None = None

    def _error(self, message: str) -> FetchError:
        return FetchError(f"fetch files: DATA_LOSS: {message}", grpc.StatusCode.DATA_LOSS)

    def accept(self, chunk: pb.FileChunk) -> None:
        if wire.crc32c(chunk.data) != chunk.crc32c:
            raise self._error(f"{chunk.path}: chunk at byte {chunk.offset} failed its crc32c")
        if self._open is None or self._open[0] != chunk.path:
            self._start(chunk)
        assert self._open is not None
        path, handle, tmp, running = self._open
        if handle.tell() != chunk.offset:
            raise self._error(f"{path}: chunk at byte {chunk.offset}, expected {handle.tell()}")
        handle.write(chunk.data)
        running = wire.crc32c_combine(running, chunk.crc32c, len(chunk.data))
        self._open = (path, handle, tmp, running)
        if chunk.last:
            if running != chunk.file_crc32c or handle.tell() != chunk.size:
                handle.close()
                tmp.unlink(missing_ok=True)
                raise self._error(f"{path}: whole-file crc32c or size mismatch")
            final = self.dest / path
            commit(handle, tmp, final)
            self.written.append(final)
            self._open = None

    def _start(self, chunk: pb.FileChunk) -> None:
        self.abort()
        rel = PurePosixPath(chunk.path)
        final = (self.dest / rel).resolve()
        if rel.is_absolute() or ".." in rel.parts or os.path.commonpath([final, self.dest]) != str(self.dest):
            raise self._error(f"server sent a path outside the destination: {chunk.path!r}")
        if chunk.offset:
            raise self._error(f"{chunk.path}: first chunk starts at byte {chunk.offset}")
        handle, tmp = atomic_write_path(final)
        self._open = (chunk.path, handle, tmp, 0)

    def abort(self) -> None:
        """Drop a half-written file (its temp file), leaving nothing partial behind."""
        if self._open is not None:
            _, handle, tmp, _ = self._open
            handle.close()
            tmp.unlink(missing_ok=True)
            self._open = None
