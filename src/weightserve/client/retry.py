"""When a failed stream is worth resuming, and how long a fetch may wait for that."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

import grpc

RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,  # server restarting or draining, connection reset
        grpc.StatusCode.INTERNAL,  # RST_STREAM and other transport breaks surface here
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
"""Codes a later stream can get past. RESOURCE_EXHAUSTED is retried only with a hint (below)."""

RETRY_AFTER_KEY = "retry-after-ms"
"""Trailing metadata by which a server says a RESOURCE_EXHAUSTED (a concurrency or rate
limit) will pass, and after how many milliseconds (docs/wire.md). Without it the error
cannot change by retrying: a memory budget too small for the model, or this client's own
"received message larger than max"."""


def retry_after(metadata: Iterable[tuple[str, str | bytes]] | None) -> float | None:
    """Seconds a failed call's trailing metadata asks the client to wait, or None without a hint."""
    for key, value in metadata or ():
        if key == RETRY_AFTER_KEY:
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
            return max(0, int(text)) / 1000 if text.isdigit() else None
    return None


@dataclass(frozen=True)
class RetryPolicy:
    """How a broken FetchShard stream is resumed: for how long, and how often at most.

    Between two streams the client waits for its channel to be ready again (so a
    restarted server is found as soon as it listens), and at least a jittered exponential
    backoff, or the server's retry-after hint when it is longer. `retry_deadline` bounds
    the time a fetch spends waiting like that, over all its breaks.
    """

    max_attempts: int | None = None
    """Streams one fetch may open (1: never resume); None leaves the bound to retry_deadline."""
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    integrity_retries: int = 3
    """How many checksum failures a fetch tolerates before raising DATA_LOSS."""
    retry_deadline: float = 120.0
    """Seconds a fetch may spend waiting to resume, summed over its breaks (enough for a
    rolling restart); past it the fetch raises FetchError with the last status."""
    stream_idle_timeout: float | None = 120.0
    """Seconds a stream may go without a message, once it has sent one, before the client
    gives it up and resumes from the last verified byte (a live server whose stream stopped
    moving; keepalive finds only dead connections). Nothing is timed before a stream's
    first message, which a cold model may take minutes to send. None: wait for ever."""

    def __post_init__(self) -> None:
        if self.retry_deadline < 0:
            raise ValueError(f"retry_deadline {self.retry_deadline} must be >= 0")
        if self.stream_idle_timeout is not None and not self.stream_idle_timeout > 0:
            raise ValueError(f"stream_idle_timeout {self.stream_idle_timeout} must be > 0 (or None)")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"max_attempts {self.max_attempts} must be >= 1 (or None)")

    def backoff(self, attempt: int) -> float:
        """Seconds to wait at least before attempt number `attempt` + 1 (1-based)."""
        ceiling = min(self.max_backoff, self.initial_backoff * (2 ** min(attempt - 1, 62)))
        return random.uniform(ceiling / 2, ceiling)

    def should_retry(self, code: grpc.StatusCode, attempt: int, hinted: bool = False) -> bool:
        """Whether a stream that ended with `code` is worth resuming after `attempt` streams.

        `hinted`: the server sent a retry-after hint (RETRY_AFTER_KEY).
        """
        if self.max_attempts is not None and attempt >= self.max_attempts:
            return False
        return code in RETRYABLE or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and hinted)
