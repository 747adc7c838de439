"""Hooks of `make fuzz`: the memory cap, a header and a summary; fuzz/campaign.py has the rest."""

from __future__ import annotations

from typing import Any

import pytest
import tests.loaders.fuzzing  # noqa: F401 - import torch, gguf and the loaders before the cap

from fuzz import campaign as fuzz


def pytest_sessionstart(session: pytest.Session) -> None:
    fuzz.cap_memory()


def pytest_report_header() -> str:
    return (
        f"fuzz: {fuzz.SECONDS:g} s per target, address space capped at +{fuzz.MEMORY_MB} MiB, "
        f"{fuzz.DEADLINE_MS} ms per example"
    )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for name, examples, took in fuzz.RESULTS:
        terminalreporter.write_line(f"fuzz {name}: {examples} examples in {took:.0f} s")


@pytest.fixture
def campaign() -> fuzz.Campaign:
    """`campaign(name, target, strategies)`: fuzz/campaign.py's `run`."""
    return fuzz.run
