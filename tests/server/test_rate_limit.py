"""A token's byte rate, shared by its streams (server/stream_gate.py RateLimit)."""

from __future__ import annotations

import asyncio

import pytest

from weightserve.server.stream_gate import RateLimit, StreamGate
from weightserve.server.tokens import Token


class Clock:
    """A clock that advances only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_takes_past_the_rate_wait_so_that_bytes_over_time_is_the_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(asyncio, "sleep", clock.sleep)
    rate = RateLimit(1000, clock)

    async def run() -> None:
        for _ in range(10):
            await rate.take(500)  # 5000 bytes at 1000 B/s: one second's burst, then four seconds of waits

    asyncio.run(run())
    assert sum(clock.slept) == pytest.approx(4.0)
    assert clock.now - 100.0 == pytest.approx(4.0)


def test_streams_of_one_token_wait_for_each_others_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:  # the clock stands still: every wait is the debt so far
        slept.append(seconds)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    rate = RateLimit(1000, lambda: 100.0)

    async def run() -> None:
        await rate.take(1000)  # stream A: the burst
        await rate.take(1000)  # stream B, at the same moment: waits for A's second
        await rate.take(500)  # stream A again: waits for both

    asyncio.run(run())
    assert slept == [pytest.approx(1.0), pytest.approx(1.5)]


def test_the_gate_paces_only_tokens_with_a_rate_and_forgets_it_after_their_last_stream() -> None:
    gate = StreamGate(10, 10, 60.0)
    slow = Token("slow", "", bytes_per_second=1 << 20)
    with gate.admit("ipv4:10.0.0.1", slow) as stream:
        assert stream.rate is not None and gate.rates["slow"] is stream.rate
        with gate.admit("ipv4:10.0.0.2", slow) as other:
            assert other.rate is stream.rate  # one rate for all its streams
    assert gate.rates == {} and gate.by_token == {}
    with gate.admit("ipv4:10.0.0.1") as anonymous:
        assert anonymous.rate is None
