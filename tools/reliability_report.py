"""Regenerate the fault table of docs/reliability.md from the marked tests and the load benchmark.

Runs every test marked `@pytest.mark.fault(...)` (`pytest -m fault --reliability-json`,
see tests/conftest.py) and `benchmarks/load.py --short --json`, groups what they
record by class of fault or input, and rewrites docs/reliability.md between its
`<!-- reliability-table:start -->` and `<!-- reliability-table:end -->` lines.

    python tools/reliability_report.py              # run both, rewrite the table
    python tools/reliability_report.py --check      # run both; exit 1 if the table's classes
                                                    # changed or a case failed; the doc is not written
    python tools/reliability_report.py --tests-json T --load-json L   # tabulate saved records only

Exits 1 when a marked test or the load run failed (the table is still written, showing
it), 2 when a run could not produce its record.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightserve.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
START, END = "<!-- reliability-table:start -->", "<!-- reliability-table:end -->"
LOAD_SOURCE = "benchmarks/load.py --short"

PROMISES = {
    "byte flipped in flight": "the chunk fails its crc32c; the client asks again from its last verified byte",
    "every stream corrupted in flight": "DATA_LOSS after `integrity_retries` + 1 checksum failures; nothing returned",
    "SIGTERM with a stream in flight": "the stream finishes unbroken; new calls UNAVAILABLE; exit 0 within the grace",
    "server SIGKILLed mid-stream and restarted": "the client resumes from its last verified byte; bit-identical",
    "model changed while a fetch was broken": "FAILED_PRECONDITION; a new fetch gets the new weights whole",
    "checkpoint file truncated while served": "DATA_LOSS naming the file, for that stream only; the server serves on",
    "checkpoint file rewritten in place while served": "DATA_LOSS, never mixed bytes; the next fetch is a new revision",
    "hostile safetensors header": "CorruptCheckpointError naming the problem (DATA_LOSS when served); no crash",
    "fuzzed safetensors header (arbitrary bytes or JSON)": "no exception but CorruptCheckpointError",
    "malicious pickle checkpoint": "refused by torch's weights-only unpickler, naming the globals; never runs",
    "corrupt or truncated .bin/.pt": "CorruptCheckpointError (DATA_LOSS), not an unsafe-pickle refusal",
    "malformed or lying index json": "CorruptCheckpointError naming the file or tensor (DATA_LOSS)",
    "model name or symlink escaping the roots": "NOT_FOUND (INVALID_ARGUMENT when empty); nothing outside is read",
    "impossible rank or world size": "INVALID_ARGUMENT naming the numbers",
    "unknown tensor or format": "NOT_FOUND naming it; INVALID_ARGUMENT for a format no loader reads",
    "bad resume point": "INVALID_ARGUMENT (no manifest id, offset past the tensor) or NOT_FOUND (tensor)",
    "stale revision or manifest id": "FAILED_PRECONDITION: fetch the manifest again",
    "broken model directory beside good ones": "the others are still listed and served",
    "remote download dropped or failing": "each request tried at most 5 times with backoff; exact bytes, or no files",
    "S3 object replaced": "a new revision; a download never mixes versions",
    "remote source outside the allow-list": "PERMISSION_DENIED",
    "missing bucket or prefix, broken index, unreachable store": "an error naming the problem (NOT_FOUND, ...)",
    "model over the disk cache budget": "RESOURCE_EXHAUSTED naming --disk-cache-bytes",
    "`weightserve shard` killed mid-write": "only complete files and no metadata: refused until shard runs again",
    "flipped bit in a saved shard": "`shard --check` names it; serving it is DATA_LOSS naming the tensor",
    "saved shards missing a rank or tensor, or misshapen": "`shard --check` names each problem and exits 1",
    "bad or unknown server setting": "refused at start, naming the setting (the closest one, for a typo)",
    "bad FileChunk (crc, size, offset, path)": "DATA_LOSS; nothing written outside the destination, nothing left",
    "request past a static or model limit": "INVALID_ARGUMENT naming the limit, answered at once; others are served",
    "load report that could overflow, or sent twice": (
        "counts above 2^48 INVALID_ARGUMENT; a resent (rank, sequence) counted once"
    ),
    "streams over the per-peer or overall limit": (
        "RESOURCE_EXHAUSTED with a retry-after-ms hint; Unix peers by process"
    ),
    "client that stops reading mid-stream": (
        "cut after --stream-idle-seconds (DEADLINE_EXCEEDED); the client resumes; memory given back"
    ),
    "random requests of every RPC at a memory-capped server": (
        "never INTERNAL or UNKNOWN; within its cap; a bit-identical fetch after"
    ),
    "expert mapping version reused, forgotten or unknown": (
        "a version names one placement forever; unknown is FAILED_PRECONDITION"
    ),
    "one model spelled several ways": "one canonical name: one cache entry, one expert mapping",
    "unknown or expired control job": "NOT_FOUND naming the job id; at most 256 finished jobs kept",
    "manifest whose expert tensors and placement disagree": "the client refuses it before fetching (DATA_LOSS)",
    "unreadable checkpoint file (permissions)": (
        "FAILED_PRECONDITION naming the file (base name only); listings skip the model, others serve"
    ),
    "pickle whose views expand or overlap": (
        "CorruptCheckpointError naming the tensor, before any storage is read; memory does not grow"
    ),
    "fuzzed checkpoint of any format (short campaign)": (
        "no exception but CorruptCheckpointError or PreconditionError; `make fuzz` runs longer campaigns"
    ),
    "hostile GGUF header": "CorruptCheckpointError naming the field; counts bounded by the file's size",
    "hostile sharded_state metadata": "CorruptCheckpointError naming the field; nothing sized by it",
    "manifest too big for one message": (
        "paged (3 MiB pages); an unpaged ask over 4 MiB is FAILED_PRECONDITION naming page_size"
    ),
    "model changed between manifest pages": (
        "a token of another manifest is INVALID_ARGUMENT; the client starts over once"
    ),
    "server down longer than the retry deadline": (
        "the client gives up after retry_deadline (120 s) of waiting, naming the last error"
    ),
    "client without the server's trust, or plaintext to TLS": (
        "the handshake fails; the client says UNAVAILABLE with gRPC's reason, not a bare deadline"
    ),
    "missing, unknown or out-of-scope token": (
        "UNAUTHENTICATED or PERMISSION_DENIED naming nothing outside the token; audited, counted by reason"
    ),
    "token that would travel in plaintext": "the client refuses to send it (ValueError) unless told to",
    "shared-memory segment unsealed, resized or mislabelled": (
        "the client refuses to map it (DATA_LOSS) and closes the descriptor"
    ),
    "shared-memory grant that disagrees with its manifest": "the client refuses it before mapping anything (DATA_LOSS)",
    "client killed while holding shared-memory segments": "its lease connection closes; the segments are released",
    "server gone while clients hold shared-memory segments": "the clients' tensors stay valid and writable",
    "model whose own cached chunks fill the budget": (
        "its cached chunks give way to the stream's window; it still streams"
    ),
}
"""What the service does for each class. A class missing here takes the `expect=` of its markers."""

AREAS = ("tests/integration", "benchmarks", "tests/server", "tests/client", "tests/loaders", "tests/sharding")
"""Rows are ordered by where their first case lives (then by class); other folders follow."""


@dataclass
class Row:
    fault: str
    expects: set[str] = field(default_factory=set)
    where: set[str] = field(default_factory=set)
    tests: int = 0
    cases: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    details: list[str] = field(default_factory=list)

    def promise(self) -> str:
        return PROMISES.get(self.fault) or "; ".join(sorted(self.expects)) or "(say what with expect=...)"

    def result(self) -> str:
        if set(self.outcomes) <= {"passed"}:
            return "passed"
        return ", ".join(f"{n} {outcome}" for outcome, n in sorted(self.outcomes.items()))

    def order(self) -> tuple[int, str]:
        first = min(self.where)
        area = next((i for i, a in enumerate(AREAS) if first.startswith(a)), len(AREAS))
        return area, self.fault.lower()


def tabulate(tests: dict[str, Any], load: dict[str, Any] | None) -> list[Row]:
    """One row per class of fault or input, over the test records and the load run's faults."""
    rows: dict[str, Row] = defaultdict(lambda: Row(""))
    for record in tests["tests"]:
        row = rows[record["fault"]]
        row.fault = record["fault"]
        if record.get("expect"):
            row.expects.add(record["expect"])
        row.where.add(record["nodeid"].split("::")[0])
        row.tests += 1
        row.cases += record["cases"]
        row.outcomes[record["outcome"]] += 1
    for record in (load or {}).get("faults", []):
        row = rows[record["fault"]]
        row.fault = record["fault"]
        row.expects.add(record["expect"])
        row.where.add(record["source"])
        row.cases += record["cases"]
        row.outcomes[record["outcome"]] += 1
        row.details.append(record["detail"])
    return sorted(rows.values(), key=Row.order)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(rows: list[Row], tests: dict[str, Any], load: dict[str, Any] | None) -> str:
    """The generated section: a summary line, the table, and what did not run."""
    marked = sum(r.tests for r in rows)
    lines = [
        START,
        "<!-- generated by tools/reliability_report.py: edit the markers and PROMISES, not this table -->",
        "",
        f"{len(rows)} classes of fault or input; {marked} marked tests "
        f"(a parametrized id is one test) and the short load run; {sum(r.cases for r in rows):,} cases.",
    ]
    if load is not None:
        counts = load["counts"]
        lines.append(
            f"The load run: {counts['started']} fetches started, {counts['completed']} completed and verified, "
            f"{counts['failed']} failed, {counts['abandoned']} abandoned by design"
            + (f"; missed: {', '.join(load['missed'])}" if load["missed"] else "")
            + "."
        )
    lines += [
        "",
        "| fault or input | what the service does | cases | tests | result | where |",
        "|---|---|---:|---:|---|---|",
    ]
    for r in rows:
        promise = r.promise() + (f" ({'; '.join(r.details)})" if r.details else "")
        tests_cell = str(r.tests) if r.tests else "load run"
        where = ", ".join(f"`{w}`" for w in sorted(r.where))
        lines.append(
            f"| {_cell(r.fault)} | {_cell(promise)} | {r.cases:,} | {tests_cell} | {r.result()} | {_cell(where)} |"
        )
    if tests.get("collection_errors"):
        lines += ["", "Not in the table, because their modules failed to import:"]
        lines += [f"- `{nodeid}`" for nodeid in tests["collection_errors"]]
    lines.append(END)
    return "\n".join(lines) + "\n"


def splice(doc: str, section: str) -> str:
    """`doc` with the text from START to END (inclusive) replaced by `section`."""
    start, end = doc.find(START), doc.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{DOC}: no {START} ... {END} section to rewrite")
    return doc[:start] + section + doc[end + len(END) :].lstrip("\n")


def table_classes(doc: str) -> list[str]:
    """The first column of the table between the markers."""
    start, end = doc.find(START), doc.find(END)
    body = doc[start:end].splitlines() if start >= 0 else []
    table = [line for line in body if line.startswith("| ") and not line.startswith("| fault or input ")]
    return [line.split(" | ")[0][2:] for line in table]


def run_tests(tmp: Path, extra: list[str]) -> dict[str, Any]:
    out = tmp / "tests.json"
    cmd = [sys.executable, "-m", "pytest", "-m", "fault", "-q", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", "--reliability-json", str(out), *extra]  # fmt: skip
    sys.stderr.write(f"$ {' '.join(cmd[1:])}\n")
    code = subprocess.run(cmd, cwd=ROOT, check=False).returncode
    if code not in (0, 1) or not out.exists():
        raise SystemExit(f"pytest exited {code} without a record: nothing to tabulate")
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def run_load(tmp: Path) -> dict[str, Any]:
    out = tmp / "load.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSERVE_") or k == "WEIGHTSERVE_BENCH_DIR"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "load.py"), "--short", "--json", str(out)]
    sys.stderr.write(f"$ {' '.join(cmd[1:])}\n")
    code = subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode
    if not out.exists():
        raise SystemExit(f"load.py exited {code} without a summary: nothing to tabulate")
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the doc instead of writing it")
    parser.add_argument("--tests-json", type=Path, help="a saved --reliability-json record: do not run pytest")
    parser.add_argument("--load-json", type=Path, help="a saved load.py --json summary: do not run the benchmark")
    parser.add_argument("--no-load", action="store_true", help="leave the load run out of the table")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tests = json.loads(args.tests_json.read_text()) if args.tests_json else run_tests(Path(tmp), args.pytest_args)
        load = None
        if not args.no_load:
            load = json.loads(args.load_json.read_text()) if args.load_json else run_load(Path(tmp))
    rows = tabulate(tests, load)
    section = render(rows, tests, load)
    doc = DOC.read_text()
    failed = [r.fault for r in rows if r.result() != "passed"] + list(tests.get("collection_errors", []))
    if args.check:
        before, after = table_classes(doc), table_classes(section)
        if sorted(before) != sorted(after):
            sys.stdout.write(f"{DOC.name} is out of date: classes {sorted(set(before) ^ set(after))}\n")
            return 1
    else:
        atomic_write_text(DOC, splice(doc, section))
        sys.stdout.write(f"wrote {len(rows)} rows to {DOC.relative_to(ROOT)}\n")
    for fault in failed:
        sys.stdout.write(f"NOT PASSED: {fault}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
