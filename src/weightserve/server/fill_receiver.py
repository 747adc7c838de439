"""The filler's side of FillReplica: verified chunks into a download directory, and a check that all came.

A peer's stream can end with status OK before it sent everything (a bug, an older or a
hostile peer, a proxy that closes streams cleanly). Per-chunk and per-file crc32c cannot
notice a file that never started, so the first message of every stream lists every file
of the entry with its size (`FileChunk.entry`), and a fill is complete only when each of
those files arrived whole. A peer that sends no list predates it and is refused: its copy
cannot be checked, and the fleet falls back to another peer or the origin.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from weightserve import wire
from weightserve.errors import UnavailableError
from weightserve.storage.disk_cache import UNFINISHED_SUFFIX
from weightserve.v1 import weightserve_pb2 as pb


class FillReceiver:
    """Writes verified chunks into `directory`, file by file; knows where to resume and what is missing.

    A file being received is `<name>.fill` until its whole-file checksum matches; the disk
    cache refuses to publish a directory that still holds one.
    """

    def __init__(self, directory: Path, source: str) -> None:
        self.directory = directory
        self.source = source
        """The peer and key, for error messages."""
        self.expected: dict[str, int] | None = None
        """Every file of the entry and its size, from the first message the peer sent."""
        self.done: set[str] = set()
        self.path = ""
        self.offset = 0
        self.last_done: tuple[str, int] | None = None
        self._file: BinaryIO | None = None
        self._running = 0
        self._listed = False

    def start_stream(self) -> None:
        """A new stream (first or resumed) begins: its first message must carry the file list again."""
        self._listed = False

    def accept(self, chunk: pb.FileChunk) -> None:
        """Take one chunk: check it against the list and its checksums, write it, finish its file on `last`.

        Raises:
            UnavailableError: the chunk does not fit the list, its place, or its checksum.
        """
        if not self._listed:
            self._check_list(chunk)
        expected = self.expected or {}
        if expected.get(chunk.path) != chunk.size:
            raise UnavailableError(f"{self.source}: sent {chunk.path!r} of {chunk.size} bytes, not in its file list")
        if chunk.path != self.path or chunk.offset != self.offset:
            if chunk.offset != 0:
                raise UnavailableError(
                    f"{self.source}: sent {chunk.path}@{chunk.offset}, expected {self.path}@{self.offset}"
                )
            self._open(chunk.path)
        if wire.crc32c(chunk.data) != chunk.crc32c:
            raise UnavailableError(f"{self.source}: checksum mismatch in {chunk.path} at {chunk.offset}")
        assert self._file is not None
        self._file.write(chunk.data)
        self._running = wire.crc32c_combine(self._running, chunk.crc32c, len(chunk.data))
        self.offset += len(chunk.data)
        if chunk.last:
            if self._running != chunk.file_crc32c or self.offset != chunk.size:
                raise UnavailableError(f"{self.source}: {chunk.path} does not match its whole-file checksum")
            self.close()
            final = self.directory / chunk.path
            os.replace(final.with_name(final.name + UNFINISHED_SUFFIX), final)
            self.done.add(chunk.path)
            self.last_done, self.path, self.offset = (chunk.path, chunk.size), "", 0

    def _check_list(self, chunk: pb.FileChunk) -> None:
        self._listed = True
        if not chunk.HasField("entry"):
            raise UnavailableError(
                f"{self.source}: the peer sends no file list (it predates it), so a complete copy "
                "cannot be told from a cut one; not filling from it"
            )
        listed = {f.path: f.size for f in chunk.entry.files}
        if len(listed) != len(chunk.entry.files):
            raise UnavailableError(f"{self.source}: the file list names a file twice")
        if self.expected is not None and listed != self.expected:
            raise UnavailableError(f"{self.source}: the file list changed between streams")
        self.expected = listed

    def finish(self) -> None:
        """The stream ended with status OK: every listed file must have arrived whole.

        Raises:
            UnavailableError: a file is unfinished or was never sent (the stream ended early).
        """
        if self.expected is None:
            raise UnavailableError(f"{self.source}: the stream ended before it listed the entry's files")
        if self.path:
            raise UnavailableError(f"{self.source}: the stream ended inside {self.path} at byte {self.offset}")
        missing = sorted(set(self.expected) - self.done)
        if missing:
            raise UnavailableError(f"{self.source}: the stream ended without {len(missing)} file(s): {missing[:5]}")

    def _open(self, name: str) -> None:
        self.close()
        root = self.directory.resolve()
        target = (root / name).resolve()
        if os.path.commonpath([target, root]) != str(root):
            raise UnavailableError(f"{self.source}: sent a path outside the model: {name!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        self._file = target.with_name(target.name + UNFINISHED_SUFFIX).open("wb")
        self.path, self.offset, self._running = name, 0, 0

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def resume_from(self) -> tuple[str, int]:
        """Where to ask next: within the unfinished file, or at the end of the last finished one (the next file)."""
        if self.path:
            return self.path, self.offset
        return self.last_done or ("", 0)
