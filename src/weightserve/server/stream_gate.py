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
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from weightserve.errors import ResourceExhaustedError, StreamStalledError

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
        self.refused = 0
        self.stalled = 0

    @contextmanager
    def admit(self, peer: str) -> Iterator[None]:
        """Hold a stream slot for `peer` for the block.

        Raises:
            ResourceExhaustedError: the overall or the peer's limit is reached (with a retry-after hint).
        """
        if self.active >= self.max_streams or self.by_peer[peer] >= self.max_per_peer:
            self.refused += 1
            which = (
                f"{self.active} streams of at most {self.max_streams} (--max-streams)"
                if self.active >= self.max_streams
                else f"{self.by_peer[peer]} streams from {peer} of at most {self.max_per_peer} (--max-streams-per-peer)"
            )
            raise ResourceExhaustedError(f"the server is serving {which}; retry shortly", RETRY_AFTER_SECONDS)
        self.active += 1
        self.by_peer[peer] += 1
        try:
            yield
        finally:
            self.active -= 1
            self.by_peer[peer] -= 1
            if not self.by_peer[peer]:
                del self.by_peer[peer]
            if self.on_end is not None:
                self.on_end()

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
