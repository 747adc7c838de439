"""Atomic writes: readers see the old file or the whole new one, never part of it.

Every file weightserve writes for others to read (downloads, saved shards, fetched
files, state) goes through here: a temp file in the same directory (so the rename
cannot cross a file system), fsync, rename over the target, then fsync of the
directory so the rename itself survives a crash. Stdlib only: the client uses it too.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (a rename, a new file) durable."""
    fsync_path(path)


def fsync_path(path: Path) -> None:
    """Make what was written to `path` (a file's bytes, a directory's entries) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path_beside(path: Path) -> Path:
    """A new, empty hidden file in `path`'s directory, named after it (mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    return Path(name)


def commit_temp(tmp: Path, path: Path, *, mode: int | None = None, sync_dir: bool = True) -> None:
    """fsync `tmp`, give it `mode`, rename it over `path` and fsync the directory."""
    with tmp.open("rb+") as f:
        os.fsync(f.fileno())
    if mode is not None:
        tmp.chmod(mode)
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)


def atomic_write(path: Path, write: Callable[[Path], object], *, mode: int | None = None) -> None:
    """Call `write(tmp)` for a temp path beside `path`, then commit it over `path`.

    Args:
        path: the file to create or replace.
        write: fills the temp file by path (safetensors' save_file, shutil.copyfile, ...).
        mode: permission bits for the result (mkstemp creates 0600).
    """
    tmp = temp_path_beside(path)
    try:
        write(tmp)
        commit_temp(tmp, path, mode=mode)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Replace `path` with `data` atomically."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data), mode=mode)


def atomic_write_text(path: Path, text: str, *, mode: int | None = None) -> None:
    """Replace `path` with `text` (UTF-8) atomically."""
    atomic_write_bytes(path, text.encode(), mode=mode)


@contextmanager
def atomic_open(path: Path, *, mode: int | None = None) -> Iterator[IO[bytes]]:
    """A binary file handle whose content replaces `path` when the block exits cleanly.

    On an exception nothing is left behind: the temp file is removed and `path` is
    untouched. For writers that produce bytes piece by piece (a download, a stream).
    """
    tmp = temp_path_beside(path)
    try:
        with tmp.open("wb") as handle:
            yield handle
            handle.flush()
        commit_temp(tmp, path, mode=mode)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
