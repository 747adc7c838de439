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
    """Consumes FileChunks and writes each file atomically under `dest`.

    A file is committed only when its last chunk arrived and its size and whole-file
    crc32c agree; anything else (a chunk out of order, a path outside `dest` or given
    twice, a file abandoned for the next, a stream ending inside one) is DATA_LOSS.
    """

    def __init__(self, dest: Path) -> None:
        self.dest = dest.resolve()
        self.written: list[Path] = []
        self.chunks = 0
        """Chunks received so far (a stalled stream is one whose count stops)."""
        self._open: tuple[str, IO[bytes], Path, int] | None = None
        self._size = 0  # the open file's size, as its first chunk gave it
        self._finals: set[Path] = set()  # every file started, so none is written twice

    def _error(self, message: str) -> FetchError:
        return FetchError(f"fetch files: DATA_LOSS: {message}", grpc.StatusCode.DATA_LOSS)

    def accept(self, chunk: pb.FileChunk) -> None:
        self.chunks += 1
        if wire.crc32c(chunk.data) != chunk.crc32c:
            raise self._error(f"{chunk.path}: chunk at byte {chunk.offset} failed its crc32c")
        if self._open is None:
            self._start(chunk)
        assert self._open is not None
        path, handle, tmp, running = self._open
        if path != chunk.path:
            raise self._error(f"{path} ended at byte {handle.tell()} of its {self._size}, before its last chunk")
        if handle.tell() != chunk.offset:
            raise self._error(f"{path}: chunk at byte {chunk.offset}, expected {handle.tell()}")
        if chunk.size != self._size or chunk.offset + len(chunk.data) > chunk.size:
            raise self._error(f"{path}: chunk at byte {chunk.offset} runs past the file's {self._size} bytes")
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
        rel = PurePosixPath(chunk.path)
        final = (self.dest / rel).resolve()
        if (
            not chunk.path
            or rel.is_absolute()
            or ".." in rel.parts
            or final == self.dest
            or os.path.commonpath([final, self.dest]) != str(self.dest)
        ):
            raise self._error(f"server sent a path outside the destination, or naming no file in it: {chunk.path!r}")
        if final in self._finals:
            raise self._error(f"server sent {chunk.path!r} twice")
        if chunk.offset:
            raise self._error(f"{chunk.path}: first chunk starts at byte {chunk.offset}")
        tmp = temp_path_beside(final)
        self._open, self._size = (chunk.path, tmp.open("wb"), tmp, 0), chunk.size
        self._finals.add(final)

    def finish(self) -> None:
        """Call when the stream ended OK: a file still open was cut short.

        Raises:
            FetchError: DATA_LOSS naming the file and how much of it arrived.
        """
        if self._open is not None:
            path, handle, _, _ = self._open
            raise self._error(f"the stream ended inside {path}, at byte {handle.tell()} of its {self._size}")

    def abort(self) -> None:
        """Drop a half-written file (its temp file), leaving nothing partial behind."""
        if self._open is not None:
            _, handle, tmp, _ = self._open
            handle.close()
            tmp.unlink(missing_ok=True)
            self._open = None
