"""Helpers for the shared-memory tests: a server's leased segments, open descriptors, waiting."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from weightserve.testing import BackgroundServer

ServeUnix = Callable[..., BackgroundServer]
"""`serve_unix(root, **config)` (tests/integration/conftest.py)."""


def leased(server: BackgroundServer) -> int:
    """Segments some client leases, over the server's open and lingering entries."""
    assert server.server is not None
    return sum(e.segments.leased for e in [*server.server.cache.open_entries(), *server.server.cache.lingering])


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))
