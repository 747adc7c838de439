"""Admission and pacing of data streams: how many run, per peer and overall, and how long one may stall.

A stream that its client stops reading holds its read-ahead chunks and its window of
the memory budget for as long as it lives, so unbounded streams are unbounded memory
(200 unread streams once took 2.4 GB) and, under a budget, a lock-out of everyone
else. Three bounds keep that in check:

- at most `max_streams` data streams at once, and `max_per_peer` from one peer: an IP
  address over TCP; over a Unix socket, the process the client says it is (the
  `x-weightserve-pid` metadata the client library sends; a process that lies evades
  only its per-peer bound, never the overall one);
- a write that the client does not take for `idle_seconds` ends the stream with
  DEADLINE_EXCEEDED ("no progress"); the client may resume where it stopped;
- a refusal is RESOURCE_EXHAUSTED with a retry-after hint, never an error that a
  client must not retry.

A token from `--auth-tokens` may add its own bounds (server/tokens.py): `max_streams`
over all its callers, and `bytes_per_second` shared by all its streams. The pacing wait
comes before the idle timer starts, so a slow token is never mistaken for a stalled client.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from weightserve.errors import ResourceExhaustedError, StreamStalledError
from weightserve.server.tokens import ANONYMOUS, Token

PID_METADATA = "x-weightserve-pid"
RETRY_AFTER_SECONDS = 2.0
"""Hint sent with a refused stream: long enough for a stream to finish or stall out."""


def peer_key(peer: str, metadata: Any) -> str:
    """Who a call comes from, for per-peer limits: the IP of a TCP peer, the process of a Unix one.

    `peer` is grpc's peer string ("ipv4:10.0.0.5:43210", "ipv6:[::1]:43210", "unix:...");
    `metadata` the call's invocation metadata (pairs of key, value).
    """
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host = address.rsplit(":", 1)[0]
        return f"{kind}:{host}"
    pid = next((str(value) for key, value in (metadata or ()) if key == PID_METADATA), "")
    return f"{kind or 'unknown'}:pid={pid[:20] or '?'}"


class StreamGate:
    """Counts data streams overall and per peer, and bounds how long a write may wait."""

    def __init__(
        self, max_streams: int, max_per_peer: int, idle_seconds: float, on_end: Callable[[], None] | None = None
    ) -> None:
        self.max_streams = max_streams
        self.on_end = on_end
        """Called after each stream (to give its buffers back to the system: server/memory.py)."""
        self.max_per_peer = max_per_peer
        self.idle_seconds = idle_seconds
        self.active = 0
        self.by_peer: collections.Counter[str] = collections.Counter()
        self.by_token: collections.Counter[str] = collections.Counter()
        self.rates: dict[str, RateLimit] = {}
        self.refused = 0
        self.stalled = 0

    @contextmanager
    def admit(self, peer: str, caller: Token = ANONYMOUS) -> Iterator[Stream]:
        """Hold a stream slot for `peer` and `caller` for the block; write the stream through what it yields.

        Raises:
            ResourceExhaustedError: the overall, the peer's or the token's limit is reached
                (with a retry-after hint).
        """
        which = ""
        if self.active >= self.max_streams:
            which = f"{self.active} streams of at most {self.max_streams} (--max-streams)"
        elif self.by_peer[peer] >= self.max_per_peer:
            which = f"{self.by_peer[peer]} streams from {peer} of at most {self.max_per_peer} (--max-streams-per-peer)"
        elif caller.max_streams and self.by_token[caller.name] >= caller.max_streams:
            which = f"{self.by_token[caller.name]} streams of token {caller.name!r}, its max_streams"
        if which:
            self.refused += 1
            raise ResourceExhaustedError(f"the server is serving {which}; retry shortly", RETRY_AFTER_SECONDS)
        self.active += 1
        self.by_peer[peer] += 1
        self.by_token[caller.name] += 1
        rate = self._rate(caller)
        try:
            yield Stream(self, rate)
        finally:
            self.active -= 1
            for counter, key in ((self.by_peer, peer), (self.by_token, caller.name)):
                counter[key] -= 1
                if not counter[key]:
                    del counter[key]
            if rate is not None and not self.by_token[caller.name]:
                self.rates.pop(caller.name, None)
            if self.on_end is not None:
                self.on_end()

    def _rate(self, caller: Token) -> RateLimit | None:
        if not caller.bytes_per_second:
            return None
        rate = self.rates.get(caller.name)
        if rate is None or rate.rate != caller.bytes_per_second:  # a reloaded token file may change it
            rate = self.rates[caller.name] = RateLimit(caller.bytes_per_second)
        return rate

    async def write(self, context: Any, message: object) -> None:
        """Hand `message` to the transport, or end the stream if the client takes nothing for idle_seconds.

        Raises:
            StreamStalledError: no progress for idle_seconds (DEADLINE_EXCEEDED; the client may resume).
        """
        try:
            await asyncio.wait_for(context.write(message), self.idle_seconds)
        except (TimeoutError, asyncio.TimeoutError):
            self.stalled += 1
            raise StreamStalledError(
                f"the stream made no progress for {self.idle_seconds:g}s (the client read nothing); "
                "resume it with the manifest id and the last verified byte"
            ) from None
        except Exception as e:
            # grpc fails a write (ExecuteBatchError) once the client has gone, before the
            # context says so: that is a cancel, for grpc to end quietly, not a server error
            raise asyncio.CancelledError(f"the client went away mid-stream ({type(e).__name__})") from e


class Stream:
    """One admitted stream: its writes are paced by its token's rate, then bounded by the idle time."""

    def __init__(self, gate: StreamGate, rate: RateLimit | None) -> None:
        self.gate = gate
        self.rate = rate

    async def write(self, context: Any, message: bytes | Any) -> None:
        """See StreamGate.write; waits first when the token's rate is spent."""
        if self.rate is not None:
            await self.rate.take(len(message) if isinstance(message, bytes) else message.ByteSize())
        await self.gate.write(context, message)


class RateLimit:
    """A byte rate shared by several streams: each take() waits until the rate allows its bytes.

    Up to one second's worth may go at once after a quiet spell; takes beyond that wait
    in turn (the allowance goes negative, so streams that share a rate share it fairly).
    """

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self.allowance = float(rate)
        self._last = clock()

    async def take(self, nbytes: int) -> None:
        now = self._clock()
        self.allowance = min(float(self.rate), self.allowance + (now - self._last) * self.rate)
        self._last = now
        self.allowance -= nbytes
        if self.allowance < 0:
            await asyncio.sleep(-self.allowance / self.rate)
