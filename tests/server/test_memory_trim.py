"""When the server hands the memory of ended streams back: once after a burst, and once more after that."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from weightserve.server import memory
from weightserve.server.memory import MemoryTrimmer

INTERVAL = 0.05


@pytest.fixture(autouse=True)
def _no_collection(monkeypatch: pytest.MonkeyPatch) -> None:
    """No cyclic collection before each trim: in a big test process it takes longer than INTERVAL."""
    monkeypatch.setattr(memory.gc, "collect", lambda: 0)


def trimmer_with_counter(executor: ThreadPoolExecutor) -> tuple[MemoryTrimmer, list[int]]:
    """A trimmer whose malloc_trim only counts its calls."""
    trimmer = MemoryTrimmer(executor, interval=INTERVAL)
    calls: list[int] = []
    trimmer._trim = lambda pad: calls.append(pad) or 1
    return trimmer, calls


def test_a_burst_of_ended_streams_is_trimmed_twice_and_then_nothing_runs() -> None:
    async def burst() -> tuple[int, int, bool]:
        with ThreadPoolExecutor(1) as executor:
            trimmer, calls = trimmer_with_counter(executor)
            for _ in range(16):
                trimmer.after_stream()
            await asyncio.sleep(INTERVAL * 6)
            return len(calls), trimmer.trims, trimmer._pending is None

    calls, trims, idle = asyncio.run(burst())
    # the first right away, one an interval later for what the streams freed after it; then quiet
    assert (calls, trims, idle) == (2, 2, True)


def test_streams_that_end_while_a_trim_waits_get_a_trim_after_them() -> None:
    async def spread() -> int:
        with ThreadPoolExecutor(1) as executor:
            trimmer, calls = trimmer_with_counter(executor)
            trimmer.after_stream()  # trimmed at once
            await asyncio.sleep(INTERVAL / 5)
            trimmer.after_stream()  # ends while the follow-up waits: that one covers it, and gets its own
            await asyncio.sleep(INTERVAL * 6)
            return len(calls)

    assert asyncio.run(spread()) == 3
