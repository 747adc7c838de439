"""The load benchmark's short run is a test: every fetch completes or is abandoned by design, none fails."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

LOAD = Path(__file__).resolve().parents[2] / "benchmarks" / "load.py"
SHORT_CLIENTS, SHORT_ROUNDS = 8, 2
ABANDONED = 1
"""Of 8 clients, client 5 stalls in its first fetch and gives up (load.py's STALLER_EVERY rule)."""

pytestmark = pytest.mark.timeout(120)


def _count(output: str, label: str) -> int:
    found = re.search(rf"^{label} fetches\s+(\d+)", output, re.MULTILINE)
    assert found, f"no '{label} fetches' line in:\n{output}"
    return int(found.group(1))


def test_short_load_run_completes_every_fetch(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSERVE_")}
    env["WEIGHTSERVE_BENCH_DIR"] = str(tmp_path / "bench")
    summary = tmp_path / "load.json"
    run = subprocess.run(
        [sys.executable, str(LOAD), "--short", "--json", str(summary)],
        capture_output=True,
        text=True,
        env=env,
        timeout=110,
        check=False,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output

    started = SHORT_CLIENTS * SHORT_ROUNDS
    assert _count(output, "started") == started, output
    assert _count(output, "failed") == 0, output
    assert _count(output, "abandoned") == ABANDONED, output
    assert _count(output, "completed") == started - ABANDONED, output

    written = json.loads(summary.read_text())
    assert written["counts"] == {"started": started, "completed": started - ABANDONED, "failed": 0,
                                 "abandoned": ABANDONED}  # fmt: skip
    assert written["missed"] == []
    faults = {row["fault"]: row for row in written["faults"]}
    assert all(row["outcome"] == "passed" for row in faults.values()), faults
    assert any(row["cases"] > 0 for name, row in faults.items() if "dropped" in name), faults
