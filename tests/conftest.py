"""Shared fixtures: small deterministic checkpoints and a real server on loopback; the reliability record."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, cast

import pytest

from weightserve.atomic import atomic_write
from weightserve.config import ServerConfig
from weightserve.testing import BackgroundServer, LlamaShape, write_llama_checkpoint

TINY_LLAMA = LlamaShape(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=200,
)
"""GQA Llama small enough that a whole fetch takes milliseconds."""


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model root holding org/tiny-llama: two safetensors files, an index and configs."""
    root = tmp_path_factory.mktemp("models")
    write_llama_checkpoint(root / "org" / "tiny-llama", TINY_LLAMA, num_files=2)
    return root


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """Give the root logger its handlers back after each test.

    A test that runs `serve` in this process has it point the root logger at the stderr
    pytest captured for that test; servers still running after it then logged into the
    closed capture ("--- Logging error --- I/O operation on closed file" in later output).
    """
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


ServeFn = Callable[..., BackgroundServer]


@pytest.fixture
def serve() -> Iterator[ServeFn]:
    """Start servers on 127.0.0.1:0 over the given roots; all are stopped after the test.

    `serve(root1, root2, **config_overrides)` returns a running BackgroundServer whose
    `.address` a client can dial (`listen` among the overrides puts it elsewhere).
    """
    started: list[BackgroundServer] = []

    def start(*roots: Path, **overrides: object) -> BackgroundServer:
        config = ServerConfig(**{"model_roots": tuple(roots), "listen": "127.0.0.1:0", **overrides})  # type: ignore[arg-type]
        server = BackgroundServer(config).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# ------------------------------------------------------------------ reliability record
#
# A test marked `@pytest.mark.fault("class of fault or input", expect="what the service
# does", cases=N)` is recorded, when pytest runs with `--reliability-json PATH`, as its
# class, what it expects, the cases it tried and its outcome. Cases: `cases=N` when
# given (a test that loops over N inputs), else the examples hypothesis ran, else 1
# (each parametrized id is its own test). tools/reliability_report.py turns the file
# into the table of docs/reliability.md.

_FAULT_CASES = pytest.StashKey[int]()
_FAULT_OUTCOME = pytest.StashKey[str]()
_FAULT_SECONDS = pytest.StashKey[float]()
_FAULT_RECORDS = pytest.StashKey[list[dict[str, Any]]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reliability-json",
        metavar="PATH",
        help="write each @pytest.mark.fault test's class, cases and outcome here (tools/reliability_report.py)",
    )


def _recording(config: pytest.Config) -> bool:
    return bool(config.getoption("reliability_json", None))


@pytest.hookimpl(hookwrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Iterator[None]:
    """Count the examples a marked hypothesis test runs (inside hypothesis's own statistics hook)."""
    if not _recording(pyfuncitem.config) or pyfuncitem.get_closest_marker("fault") is None:
        yield
        return
    try:
        from hypothesis.statistics import collector
    except ImportError:  # no hypothesis: every test is one case
        yield
        return
    chained = collector.value

    def note(stats: dict[str, Any]) -> None:
        phases = [v for k, v in stats.items() if k.endswith("-phase") and k != "shrink-phase"]
        ran = sum(1 for p in phases for case in p.get("test-cases", []) if case["status"] in ("valid", "interesting"))
        pyfuncitem.stash[_FAULT_CASES] = pyfuncitem.stash.get(_FAULT_CASES, 0) + ran
        if chained is not None:
            chained(stats)

    with cast(Any, collector).with_value(note):  # typed as a variable of None only
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep a marked test's outcome (setup, call and teardown together); record it after teardown."""
    outcome = yield
    marker = item.get_closest_marker("fault")
    if marker is None or not _recording(item.config):
        return
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    xfail = hasattr(report, "wasxfail")
    if report.when == "call" or (report.when == "setup" and not report.passed):
        names = {"passed": "xpassed" if xfail else "passed", "skipped": "xfailed" if xfail else "skipped"}
        names["failed"] = "failed" if report.when == "call" else "error"
        item.stash[_FAULT_OUTCOME] = names[report.outcome]
        item.stash[_FAULT_SECONDS] = report.duration
    if report.when != "teardown":
        return
    if not marker.args or not isinstance(marker.args[0], str):
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.fault takes the class of fault or input first")
    seconds: float = item.stash.get(_FAULT_SECONDS, 0.0)
    item.config.stash.setdefault(_FAULT_RECORDS, []).append(
        {
            "nodeid": item.nodeid,
            "fault": marker.args[0],
            "expect": str(marker.kwargs.get("expect", "")),
            "cases": int(marker.kwargs.get("cases", item.stash.get(_FAULT_CASES, 1))),
            "outcome": "error" if report.failed else item.stash.get(_FAULT_OUTCOME, "error"),
            "seconds": round(seconds, 3),
        }
    )


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Write the record; modules that failed to import are listed, as their tests are missing from it."""
    path = session.config.getoption("reliability_json", None)
    if not path:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    errors = getattr(reporter, "stats", {}).get("error", [])
    record = {
        "tests": session.config.stash.get(_FAULT_RECORDS, []),
        "collection_errors": [r.nodeid for r in errors if isinstance(r, pytest.CollectReport)],
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), partial(_write_json, record))


def _write_json(obj: object, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")
