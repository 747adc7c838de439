"""A real Prometheus on loopback for tests: scraping given targets every second, queried over HTTP.

Debian's `prometheus` package provides the binary (`make test` installs it when run as
root); without it the tests that need one skip and say so.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

JOB = "weightserve"
"""The scrape job's name: the one deploy/prometheus/rules.yaml selects and the dashboard defaults to."""
START_SECONDS = 30.0
"""Prometheus hands new targets to its scrapers in batches, every 5 s; the first scrape comes ~5 s after start."""
POLL_SECONDS = 0.05


class QueryError(AssertionError):
    """Prometheus refused a query: `status` is the HTTP status, `kind` its errorType (bad_data: a parse error)."""

    def __init__(self, expr: str, status: int, kind: str, message: str) -> None:
        super().__init__(f"{kind} ({status}): {message}\n  in: {expr}")
        self.status, self.kind = status, kind


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """One Prometheus process scraping `targets` (host:port of /metrics) under job=JOB every second."""

    def __init__(self, binary: str, workdir: Path, targets: list[str]) -> None:
        self.binary, self.workdir, self.targets = binary, workdir, targets
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self._ready = False

    def start(self) -> Prometheus:
        """Start the process (not waiting for it: queries wait until it is ready)."""
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": self.targets}]}],
        }
        (self.workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        log = (self.workdir / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [
                self.binary,
                f"--config.file={self.workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def log(self) -> str:
        return (self.workdir / "prometheus.log").read_text(errors="replace")[-4000:]

    def wait_ready(self) -> None:
        """Until /-/ready answers 200; fails with Prometheus's log if it exits or takes too long."""
        deadline = time.monotonic() + START_SECONDS
        while not self._ready:
            assert self.process is not None, "start() first"
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    self._ready = response.status == 200
            except (urllib.error.URLError, ConnectionError):
                pass
            if not self._ready:
                assert time.monotonic() < deadline, f"prometheus not ready after {START_SECONDS} s:\n{self.log()}"
                time.sleep(POLL_SECONDS)

    def _get(self, path: str, **params: str) -> dict[str, Any]:
        self.wait_ready()
        data = urllib.parse.urlencode(params).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data or None)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return dict(json.load(response))
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
            kind, message = body.get("errorType", "?"), body.get("error", "")
            raise QueryError(params.get("query", path), e.code, kind, message) from None

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector (or scalar, as one sample) of `expr` now; raises QueryError if refused."""
        data = self._get("/api/v1/query", query=expr)["data"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def value(self, expr: str) -> float:
        """The one value of `expr` (fails on none or several series)."""
        result = self.query(expr)
        assert len(result) == 1, f"{expr}: want one series, got {result}"
        return float(result[0]["value"][1])

    def wait_for_scrape(self, instance: str, after: float) -> None:
        """Until a scrape of `instance` that started after `after` (time.time()) is queryable."""
        expr = f'timestamp(up{{job="{JOB}",instance="{instance}"}})'
        deadline = time.monotonic() + START_SECONDS
        while not ((result := self.query(expr)) and float(result[0]["value"][1]) > after):
            if time.monotonic() > deadline:
                targets = self._get("/api/v1/targets")["data"]["activeTargets"]
                health = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in targets]
                raise AssertionError(f"no scrape of {instance} after {after}: targets {health}\n{self.log()}")
            time.sleep(POLL_SECONDS)
