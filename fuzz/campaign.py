"""Time-boxed hypothesis campaigns under a memory cap, for `make fuzz`.

`FUZZ_SECONDS` (default 60) bounds each target; `FUZZ_MEMORY_MB` (default 2048) is how
much address space the process may add once everything is imported (RLIMIT_AS), so a
reader that tries to allocate gigabytes fails its target instead of the host;
`FUZZ_DEADLINE_MS` (default 5000) is the slowest one example may be. Failing examples
are saved in .hypothesis/ and tried first on the next run.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SECONDS = float(os.environ.get("FUZZ_SECONDS", "60"))
MEMORY_MB = int(os.environ.get("FUZZ_MEMORY_MB", "2048"))
DEADLINE_MS = int(os.environ.get("FUZZ_DEADLINE_MS", "5000"))
BATCH = 500
"""Examples per hypothesis run; a campaign runs batches until its time is up."""

RESULTS: list[tuple[str, int, float]] = []
"""(target, examples run, seconds) of every finished campaign, for the summary."""

Campaign = Callable[[str, Callable[..., None], dict[str, st.SearchStrategy[Any]]], None]


def vm_size() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cap_memory() -> int:
    """Cap this process's address space at its current size plus FUZZ_MEMORY_MB; the cap."""
    limit = vm_size() + MEMORY_MB * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return limit


def run(name: str, target: Callable[..., None], strategies: dict[str, st.SearchStrategy[Any]]) -> None:
    """Run `target(**examples)` for FUZZ_SECONDS.

    Hypothesis runs in batches of BATCH examples, each with fresh randomness, until the
    time is up; the first failing example fails the campaign, shrunk. The peak resident
    memory may grow by at most half the cap over the campaign.
    """
    fuzz = settings(
        max_examples=BATCH,
        deadline=timedelta(milliseconds=DEADLINE_MS),
        suppress_health_check=list(HealthCheck),
    )
    examples, start, peak = 0, time.monotonic(), peak_rss()
    while time.monotonic() - start < SECONDS:

        def one(**kwargs: Any) -> None:
            nonlocal examples
            examples += 1
            target(**kwargs)

        one.__qualname__ = f"fuzz.{name}"  # the example database keys saved failures by it
        fuzz(given(**strategies)(one))()
    RESULTS.append((name, examples, time.monotonic() - start))
    grown = peak_rss() - peak
    assert grown < MEMORY_MB * 1024 * 1024 // 2, f"{name}: peak memory grew by {grown >> 20} MiB"
