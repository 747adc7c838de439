"""`make demo`'s job end to end, on a tiny model: generate, serve, fetch, verify every bit."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import TINY_LLAMA
from weightserve.demo import DEMO_MODEL, run_demo


def test_the_demo_serves_fetches_and_verifies(tmp_path: Path) -> None:
    result = run_demo(tmp_path, TINY_LLAMA)
    assert result.verified and result.model == DEMO_MODEL and result.tensors > 0
    assert "verified  yes" in result.table()
    again = run_demo(tmp_path, TINY_LLAMA)  # the second run reuses the generated checkpoint
    assert again.verified and again.nbytes == result.nbytes
