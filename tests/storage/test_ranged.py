"""Parallel ranged downloads: range planning, per-range retries, atomic files."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from weightserve.storage.ranged import (
    RangeJob,
    RemoteFile,
    ShortReadError,
    download_files,
    split_ranges,
    with_retries,
)


def test_split_ranges_covers_every_byte_once() -> None:
    file = RemoteFile("w", "k", 10, "e")
    assert [(j.start, j.end) for j in split_ranges(file, 4)] == [(0, 4), (4, 8), (8, 10)]
    assert [(j.start, j.end) for j in split_ranges(file, 10)] == [(0, 10)]
    assert split_ranges(RemoteFile("empty", "k", 0, "e"), 4) == []


def test_with_retries_retries_only_what_it_is_told() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("reset")
        return "ok"

    assert with_retries(flaky, lambda e: isinstance(e, ConnectionError), attempts=3, backoff=0.001) == "ok"
    with pytest.raises(ValueError):
        with_retries(lambda: int("x"), lambda e: isinstance(e, ConnectionError), backoff=0.001)


@pytest.mark.fault("remote download dropped or failing")
def test_download_files_retries_a_short_range_and_writes_exact_bytes(tmp_path: Path) -> None:
    blobs = {"a.safetensors": bytes(range(256)) * 40, "b.json": b"{}", "empty.txt": b""}
    files = [RemoteFile(n, f"p/{n}", len(d), f"etag-{n}") for n, d in blobs.items()]
    failed: set[tuple[str, int]] = set()
    lock = threading.Lock()

    def read(job: RangeJob) -> bytes:
        data = blobs[job.file.name][job.start : job.end]
        with lock:
            if job.start == 1024 and (job.file.name, job.start) not in failed:
                failed.add((job.file.name, job.start))
                return data[:10]  # the connection dropped mid-body
        return data

    download_files(files, tmp_path, read, lambda e: isinstance(e, ShortReadError), part_bytes=1024, threads=3)
    assert failed == {("a.safetensors", 1024)}
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == blobs


@pytest.mark.fault("remote download dropped or failing")
def test_a_download_that_keeps_failing_leaves_no_files(tmp_path: Path) -> None:
    files = [RemoteFile("a.safetensors", "k", 4096, "e")]

    def read(job: RangeJob) -> bytes:
        if job.start:
            raise ConnectionError("down")
        return b"x" * (job.end - job.start)

    with pytest.raises(ConnectionError):
        download_files(files, tmp_path, read, lambda e: isinstance(e, ConnectionError), part_bytes=1024, attempts=2)
    assert list(tmp_path.iterdir()) == []
