"""Parallel ranged downloads into preallocated files, each range retried on its own.

A big object is cut into fixed-size byte ranges fetched by a small thread pool and
written with pwrite at their offsets, so no range is held in memory longer than its
own request and a dropped connection costs one range, not the file. Transport-free:
the caller supplies `read(job) -> bytes` and says which errors are worth a retry.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tqdm.auto import tqdm

from weightserve.atomic import commit_temp, fsync_dir, temp_path_beside

logger = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1024 * 1024


@dataclass(frozen=True)
class RemoteFile:
    """One object to download: its name in the model's folder, size and version tag."""

    name: str
    key: str
    size: int
    etag: str


@dataclass(frozen=True)
class RangeJob:
    """Bytes [start, end) of one file."""

    file: RemoteFile
    start: int
    end: int


class ShortReadError(ConnectionError):
    """A range came back with fewer bytes than asked (the connection dropped mid-body)."""


def split_ranges(file: RemoteFile, part_bytes: int) -> list[RangeJob]:
    """Consecutive ranges of at most `part_bytes` covering the file (none if it is empty)."""
    return [RangeJob(file, s, min(s + part_bytes, file.size)) for s in range(0, file.size, part_bytes)]


def with_retries(
    call: Callable[[], T], retryable: Callable[[BaseException], bool], attempts: int = 5, backoff: float = 0.2
) -> T:
    """`call()`, again after an exponential, jittered pause while it fails retryably."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as e:
            if attempt == attempts or not retryable(e):
                raise
            pause = min(backoff * 2 ** (attempt - 1), 10.0) * (0.5 + random.random())
            logger.warning(
                "attempt %d of %d failed (%s: %s); retrying in %.2fs",
                attempt,
                attempts,
                type(e).__name__,
                e,
                pause,
            )
            time.sleep(pause)
    raise AssertionError("unreachable")


def download_files(
    files: Sequence[RemoteFile],
    dest: Path,
    read: Callable[[RangeJob], bytes],
    retryable: Callable[[BaseException], bool],
    *,
    part_bytes: int = 8 * MiB,
    threads: int = 8,
    attempts: int = 5,
    backoff: float = 0.2,
    label: str = "",
) -> None:
    """Download every file into `dest/<name>`, each written atomically.

    Each file goes to a hidden temp file in `dest`, preallocated to its size; ranges
    are written at their offsets, then the file is fsynced and renamed to its name.

    Raises:
        Whatever `read` raised on a range's last attempt (the first such failure).
    """
    temps: dict[str, Path] = {}
    fds = {}
    try:
        for f in files:
            temps[f.name] = temp_path_beside(dest / f.name)
            fds[f.name] = os.open(temps[f.name], os.O_WRONLY)
            os.ftruncate(fds[f.name], f.size)
        jobs = [job for f in files for job in split_ranges(f, part_bytes)]
        total = sum(f.size for f in files)
        with tqdm(total=total, unit="B", unit_scale=True, desc=label or "download", disable=None) as bar:

            def fetch(job: RangeJob) -> None:
                data = with_retries(lambda: _checked(read, job), retryable, attempts, backoff)
                _pwrite_all(fds[job.file.name], data, job.start)
                bar.update(len(data))

            with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="weightserve-download") as pool:
                futures = [pool.submit(fetch, job) for job in jobs]
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                failed = next((fut for fut in done if fut.exception() is not None), None)
                if failed is not None:
                    for fut in futures:
                        fut.cancel()
                    raise failed.exception()  # type: ignore[misc]
        for f in files:
            os.close(fds.pop(f.name))
            commit_temp(temps[f.name], dest / f.name, mode=0o644, sync_dir=False)
        fsync_dir(dest)
    finally:
        for fd in fds.values():
            os.close(fd)
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


def _checked(read: Callable[[RangeJob], bytes], job: RangeJob) -> bytes:
    data = read(job)
    if len(data) != job.end - job.start:
        raise ShortReadError(f"{job.file.key}: got {len(data)} of {job.end - job.start} bytes at offset {job.start}")
    return data


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
