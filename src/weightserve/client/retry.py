"""When a failed stream is worth resuming, and how long to wait first."""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,  # server restarting or draining, connection reset
        grpc.StatusCode.INTERNAL,  # RST_STREAM and other transport breaks surface here
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,  # the server's memory budget frees as streams end
    }
)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter."""

    max_attempts: int = 10
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    integrity_retries: int = 3
    """How many checksum failures a fetch tolerates before raising DATA_LOSS."""

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before attempt number `attempt` (1-based retries)."""
        ceiling = min(self.max_backoff, self.initial_backoff * (2 ** (attempt - 1)))
        return random.uniform(ceiling / 2, ceiling)

    def should_retry(self, code: grpc.StatusCode, attempt: int) -> bool:
        return code in RETRYABLE and attempt < self.max_attempts
