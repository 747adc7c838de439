"""Strided row gathers: the page-cache span path and the row-by-row path agree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from weightserve.loaders import sources
from weightserve.loaders.sources import FileSource

ROW, STRIDE, ROWS = 48, 160, 300


@pytest.fixture
def striped(tmp_path: Path) -> Path:
    path = tmp_path / "rows.bin"
    path.write_bytes(bytes(i % 251 for i in range(STRIDE * ROWS)))
    return path


def expected(path: Path, first: int, count: int, col: int) -> bytes:
    data = path.read_bytes()
    return b"".join(data[(first + r) * STRIDE + col : (first + r) * STRIDE + col + ROW] for r in range(count))


@pytest.mark.parametrize("span_bytes", [STRIDE, 7 * STRIDE, 1 << 20])
def test_cached_span_gather_matches_row_by_row(striped: Path, span_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "SPAN_BYTES", span_bytes)
    source = FileSource(striped)
    out = bytearray(ROW * (ROWS - 10))
    source.read_rows(3 * STRIDE + 16, ROW, STRIDE, memoryview(out))
    assert bytes(out) == expected(striped, 3, ROWS - 10, 16)
    assert source.bytes_read == len(out)  # counts the rank's bytes, however they were copied


def test_rows_not_in_the_page_cache_are_read_one_by_one(striped: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.preadv

    def nowait_refused(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        if flags:
            raise BlockingIOError("not cached")
        calls.append(offset)
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", nowait_refused)
    source = FileSource(striped)
    out = bytearray(ROW * 20)
    source.read_rows(0, ROW, STRIDE, memoryview(out))
    assert bytes(out) == expected(striped, 0, 20, 0)
    assert calls == [r * STRIDE for r in range(20)]  # storage is asked for exactly the rank's rows
    assert source.bytes_read == len(out)
