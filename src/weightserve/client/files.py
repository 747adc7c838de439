"""Writing FetchFiles streams to disk: verified, atomic, never outside `dest`."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import IO

import grpc

from weightserve import wire
from weightserve.atomic import commit_temp, temp_path_beside
from weightserve.errors import FetchError
from weightserve.v1 import weightserve_pb2 as pb


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
            handle.close()
            commit_temp(tmp, final, mode=0o644)
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
        tmp = temp_path_beside(final)
        self._open = (chunk.path, tmp.open("wb"), tmp, 0)

    def abort(self) -> None:
        """Drop a half-written file (its temp file), leaving nothing partial behind."""
        if self._open is not None:
            _, handle, tmp, _ = self._open
            handle.close()
            tmp.unlink(missing_ok=True)
            self._open = None
