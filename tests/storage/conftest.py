"""Fixtures for remote storage: moto's S3 server, a fake Hugging Face Hub, a cutting proxy.

Everything listens on 127.0.0.1; no test reaches the internet. Helpers reach the tests
as fixtures, not imports: several test folders have a conftest.py, and `import conftest`
would get whichever pytest loaded last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import unquote

import pytest

# ----------------------------------------------------------------------------- S3


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's standalone S3 server on a loopback port, shared by the session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, moto_endpoint: str) -> str:
    """AWS variables pointing boto3 at moto; returns the endpoint."""
    for var in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return moto_endpoint


@pytest.fixture(scope="session")
def moto_client(moto_endpoint: str) -> Any:
    """One boto3 client for moto, shared: building a client costs a few hundred milliseconds."""
    return s3_client(moto_endpoint)


def s3_client(endpoint: str, attempts: int = 2) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"max_attempts": attempts, "mode": "standard"}),
    )


@pytest.fixture
def bucket(aws_env: str, moto_client: Any) -> tuple[Any, str]:
    """A fresh bucket (unique name) and a client for it."""
    client = moto_client
    name = f"bucket-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return client, name


def upload_dir(client: Any, bucket: str, prefix: str, directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(directory).as_posix()}")


class CountingClient:
    """A boto3 client whose get_object calls are recorded as (key, range)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.gets: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def get_object(self, **kwargs: Any) -> Any:
        with self._lock:
            self.gets.append((kwargs["Key"], kwargs.get("Range", "")))
        return self._client.get_object(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class CuttingProxy:
    """A loopback TCP proxy that cuts one connection once it has sent `cut_after` bytes back.

    Only the first connection to pass the mark is cut (both sockets closed mid-transfer);
    every later one is relayed untouched.
    """

    def __init__(self, upstream: tuple[str, int], cut_after: int) -> None:
        self.upstream = upstream
        self.cut_after = cut_after
        self.cuts = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            upstream = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        sent = 0
        try:
            while data := src.recv(16384):
                if downstream:
                    with self._lock:
                        cut = self.cuts == 0 and sent + len(data) > self.cut_after
                        self.cuts += cut
                    if cut:
                        dst.sendall(data[: max(0, self.cut_after - sent)])
                        break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()


@pytest.fixture
def s3() -> SimpleNamespace:
    """The S3 helpers: `client(endpoint, attempts)`, `upload_dir(...)`, `counting(client)`."""
    return SimpleNamespace(client=s3_client, upload_dir=upload_dir, counting=CountingClient)


@pytest.fixture
def cutting_proxy(moto_endpoint: str) -> Iterator[Callable[[int], CuttingProxy]]:
    """`cutting_proxy(cut_after)` starts a CuttingProxy in front of moto; all are closed after the test."""
    started: list[CuttingProxy] = []
    host, port = moto_endpoint.removeprefix("http://").split(":")

    def start(cut_after: int) -> CuttingProxy:
        started.append(CuttingProxy((host, int(port)), cut_after))
        return started[-1]

    yield start
    for proxy in started:
        proxy.close()


# ------------------------------------------------------------------- Hugging Face


def build_hf_cache(
    cache_dir: Path,
    repo_id: str,
    commit: str,
    source: Path,
    *,
    refs: tuple[str, ...] = ("main",),
    symlinks: bool = True,
    skip: tuple[str, ...] = (),
) -> Path:
    """Lay `source`'s files out as huggingface_hub's cache does; returns the snapshot dir.

    `models--org--name/blobs/<sha256>` hold the bytes, `snapshots/<commit>/<file>` are
    relative symlinks to them (or plain copies), `refs/<branch>` hold the commit.
    """
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if not path.is_file() or path.name in skip:
            continue
        if symlinks:
            blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
            shutil.copyfile(path, blob)
            (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
        else:
            shutil.copyfile(path, snapshot / path.name)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(name="build_hf_cache")
def build_hf_cache_fixture() -> Callable[..., Path]:
    """`build_hf_cache(cache_dir, repo_id, commit, source, ...)`; see build_hf_cache."""
    return build_hf_cache


@dataclass
class FakeHub:
    """A minimal Hub on 127.0.0.1: revision info and file resolve, with a request log.

    `repos[repo_id][commit]` maps file names to bytes; `branches[repo_id]` maps branch
    names to commits. `delay` slows file GETs so concurrent callers overlap.
    """

    repos: dict[str, dict[str, dict[str, bytes]]] = field(default_factory=dict)
    branches: dict[str, dict[str, str]] = field(default_factory=dict)
    delay: float = 0.0
    log: list[tuple[str, str]] = field(default_factory=list)
    url: str = ""

    def add(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        commit = hashlib.sha1(
            json.dumps(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode()
        ).hexdigest()
        self.repos.setdefault(repo_id, {})[commit] = files
        self.branches.setdefault(repo_id, {})[branch] = commit
        return commit

    def requests(self, method: str) -> list[str]:
        return [path for m, path in self.log if m == method]

    def commit_of(self, repo_id: str, revision: str) -> str | None:
        if revision in self.repos.get(repo_id, {}):
            return revision
        return self.branches.get(repo_id, {}).get(revision)


_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/?]+)")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>[^?]+)")


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, headers: dict[str, str], body: bytes = b"", head: bool = False) -> None:
            self.send_response(status)
            for k, v in {**headers, "Content-Length": headers.get("Content-Length", str(len(body)))}.items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _not_found(self, code: str, head: bool = False) -> None:
            self._send(
                404,
                {"X-Error-Code": code, "Content-Type": "application/json"},
                json.dumps({"error": code}).encode(),
                head,
            )

        def do_GET(self) -> None:
            self._serve(head=False)

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def _serve(self, head: bool) -> None:
            path = unquote(self.path)
            hub.log.append(("HEAD" if head else "GET", path.split("?")[0]))
            if m := _INFO.match(path):
                self._info(m["repo"], m["rev"])
            elif m := _RESOLVE.match(path):
                self._file(m["repo"], m["rev"], m["file"], head)
            else:
                self._not_found("RepoNotFound", head)

        def _info(self, repo: str, revision: str) -> None:
            if repo not in hub.repos:
                return self._not_found("RepoNotFound")
            commit = hub.commit_of(repo, revision)
            if commit is None:
                return self._not_found("RevisionNotFound")
            body = {
                "id": repo,
                "sha": commit,
                "siblings": [{"rfilename": n} for n in sorted(hub.repos[repo][commit])],
            }
            self._send(200, {"Content-Type": "application/json"}, json.dumps(body).encode())

        def _file(self, repo: str, revision: str, name: str, head: bool) -> None:
            commit = hub.commit_of(repo, revision)
            if repo not in hub.repos:
                return self._not_found("RepoNotFound", head)
            if commit is None:
                return self._not_found("RevisionNotFound", head)
            data = hub.repos[repo][commit].get(name)
            if data is None:
                return self._send(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, b"", head)
            etag = f'"{hashlib.sha256(data).hexdigest()}"'
            headers = {
                "X-Repo-Commit": commit,
                "ETag": etag,
                "X-Linked-Etag": etag,
                "X-Linked-Size": str(len(data)),
                "Content-Type": "application/octet-stream",
                "Accept-Ranges": "bytes",
            }
            if not head and hub.delay:
                time.sleep(hub.delay)
            self._send(200, headers, data, head)

    return Handler


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield hub
    server.shutdown()
    server.server_close()


@pytest.fixture
def hub_env(monkeypatch: pytest.MonkeyPatch, fake_hub: FakeHub) -> FakeHub:
    """huggingface_hub pointed at the fake Hub, online, whatever the outer environment says.

    The variables are set for `HuggingFaceStorage.from_env`, which reads them when it
    runs; `huggingface_hub.constants` read them at import, so the offline flag there is
    patched too (its HTTP session refuses every request while it is set).
    """
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True, raising=False)
    return fake_hub


@pytest.fixture
def hf_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE at an empty directory (returned) to build a cache in."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # were anything to call out, it would fail fast
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache
