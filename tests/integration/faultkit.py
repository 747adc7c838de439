"""Fault injection for integration tests: a loopback TCP proxy, an HTTP/2 corruptor, a server process.

`FaultProxy` sits between a gRPC client and server on 127.0.0.1. It counts the bytes
the server sends, can hold them back after a given count (`pause_after`, `resume`),
drop every live connection (`sever`), and pass the server's bytes through a parser
that may change them in place (`Corruptor`).

`Corruptor` parses the server->client half of a cleartext HTTP/2 connection (frames:
9-byte header of length(3), type(1), flags(1), stream id(4); no preface in this
direction), follows the gRPC length-prefixed messages (1 flag byte, 4-byte length)
carried in each stream's DATA frames, and flips one byte in the middle of the messages
its policy picks. gRPC has no checksum of its own, so only weightserve's crc32c can
notice.

`ServerProcess` runs `weightserve serve` as a child process, so a test can SIGKILL or
SIGTERM it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load_file

from weightserve.testing import LlamaShape

HOST = "127.0.0.1"
MAX_PROXY_SECONDS = 120.0
"""No proxy connection outlives this, whatever a test forgets to do."""
POLL_SECONDS = 0.05
"""Socket and event timeouts inside the proxy: how fast it notices close()."""

# ----------------------------------------------------------------- checkpoints

MID_LLAMA = LlamaShape(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=2048,
)
"""About 5 MB of bf16 (two files of ~2.5 MB): dozens of 64 KiB chunks, fetched in well under a second."""

MID_MODEL = "org/mid-llama"


def load_checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in `model_dir`, read by the reference reader."""
    out: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def assert_bit_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Same names, dtypes, shapes and bytes."""
    assert sorted(got) == sorted(want)
    for name, expected in want.items():
        actual = got[name]
        assert (actual.dtype, tuple(actual.shape)) == (expected.dtype, tuple(expected.shape)), name
        a = actual.contiguous().reshape(-1).view(torch.uint8)
        b = expected.contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(a, b), f"{name}: bytes differ from the checkpoint"


# ------------------------------------------------------------------ networking


def free_port() -> int:
    """A loopback port nobody listened on a moment ago (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def health_status(address: str, timeout: float = 2.0) -> int | grpc.StatusCode:
    """The overall health status on a fresh connection, or the call's error code."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as e:
            return e.code()  # type: ignore[no-any-return]
        return int(reply.status)


def wait_serving(address: str, timeout: float = 30.0, alive: Callable[[], str | None] | None = None) -> None:
    """Block until `address` answers a health check SERVING, or fail.

    `alive()` returns None while the server can still come up, or why it cannot.
    """
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(int(timeout / 0.25) + 1):
            if alive is not None and (why := alive()) is not None:
                raise AssertionError(f"server at {address} died while starting: {why}")
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=min(0.5, left), wait_for_ready=True)
            except grpc.RpcError:
                continue  # not listening yet: wait_for_ready waited out the timeout
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
    raise AssertionError(f"server at {address} not SERVING within {timeout}s")


# ----------------------------------------------------------------------- proxy


class Corruptor:
    """Flips one byte in the middle of the gRPC messages `pick(number, length)` chooses.

    `number` counts the server's messages on all connections (1-based); `length` is the
    message's length. Byte `length // 2` is far past a TensorChunk's framing when the
    message carries a large payload, so the flip lands in tensor bytes.
    """

    def __init__(self, pick: Callable[[int, int], bool]) -> None:
        self.pick = pick
        self.messages = 0
        self.flips = 0
        self._lock = threading.Lock()

    @classmethod
    def once(cls, after: int, min_length: int) -> Corruptor:
        """Flip a byte in the first message numbered `after` or later of at least `min_length` bytes."""
        flipped = threading.Event()

        def pick(number: int, length: int) -> bool:
            if flipped.is_set() or number < after or length < min_length:
                return False
            flipped.set()
            return True

        return cls(pick)

    @classmethod
    def every(cls, min_length: int) -> Corruptor:
        """Flip a byte in every message of at least `min_length` bytes."""
        return cls(lambda number, length: length >= min_length)

    def parser(self) -> _Http2Parser:
        """A parser for one connection's server->client bytes."""
        return _Http2Parser(self)

    def _choose(self, length: int) -> int | None:
        with self._lock:
            self.messages += 1
            if self.pick(self.messages, length):
                self.flips += 1
                return length // 2
            return None


@dataclass
class _Message:
    """Where one HTTP/2 stream is within its current gRPC message."""

    prefix: bytearray = field(default_factory=bytearray)
    length: int = 0
    pos: int = 0
    flip_at: int | None = None


class _Http2Parser:
    """Incremental parser of server->client HTTP/2 frames; edits DATA payloads in place."""

    DATA, PADDED = 0, 0x8

    def __init__(self, corruptor: Corruptor) -> None:
        self.corruptor = corruptor
        self.header = bytearray()
        self.left = 0  # payload bytes of the current frame not yet seen
        self.type = self.stream = 0
        self.messages: dict[int, _Message] = {}

    def feed(self, buf: bytearray) -> None:
        i = 0
        while i < len(buf):
            if self.left == 0:
                take = min(9 - len(self.header), len(buf) - i)
                self.header += buf[i : i + take]
                i += take
                if len(self.header) == 9:
                    self.left = int.from_bytes(self.header[:3], "big")
                    self.type, flags = self.header[3], self.header[4]
                    self.stream = int.from_bytes(self.header[5:9], "big") & 0x7FFFFFFF
                    self.header.clear()
                    if self.type == self.DATA and flags & self.PADDED:
                        raise AssertionError("padded DATA frame: the corruptor does not parse padding")
                continue
            take = min(self.left, len(buf) - i)
            if self.type == self.DATA:
                self._data(buf, i, take)
            i += take
            self.left -= take

    def _data(self, buf: bytearray, start: int, n: int) -> None:
        msg = self.messages.setdefault(self.stream, _Message())
        end = start + n
        while start < end:
            if len(msg.prefix) < 5:
                take = min(5 - len(msg.prefix), end - start)
                msg.prefix += buf[start : start + take]
                start += take
                if len(msg.prefix) == 5:
                    msg.length = int.from_bytes(msg.prefix[1:5], "big")
                    msg.pos = 0
                    msg.flip_at = self.corruptor._choose(msg.length)
                    if msg.length == 0:
                        msg.prefix.clear()
                continue
            take = min(msg.length - msg.pos, end - start)
            if msg.flip_at is not None and msg.pos <= msg.flip_at < msg.pos + take:
                buf[start + msg.flip_at - msg.pos] ^= 0xFF
                msg.flip_at = None
            msg.pos += take
            start += take
            if msg.pos == msg.length:
                msg.prefix.clear()


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.closed = threading.Event()
        self.s2c_bytes = 0
        """Server->client bytes forwarded on this connection."""

    def close(self) -> None:
        self.closed.set()
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class FaultProxy:
    """A loopback TCP proxy in front of `upstream_port` (see the module docstring).

    Example:
        >>> with FaultProxy(server_port) as proxy:  # doctest: +SKIP
        ...     proxy.pause_after(1 << 20)
        ...     WeightClient(proxy.address)
    """

    def __init__(self, upstream_port: int, corruptor: Corruptor | None = None) -> None:
        self.upstream_port = upstream_port
        self.corruptor = corruptor
        self.s2c_bytes = 0
        """Server->client bytes forwarded so far, over all connections."""
        self.connections = 0
        self.paused = threading.Event()
        """Set while bytes are held back by pause_after()."""
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._pause_at: int | None = None
        self._link_cap: int | None = None
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._links: list[_Link] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server((HOST, 0))
        self._listener.settimeout(POLL_SECONDS)
        self.port = int(self._listener.getsockname()[1])
        self.address = f"{HOST}:{self.port}"
        self._spawn(self._accept_loop)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pause_after(self, nbytes: int) -> None:
        """Forward server bytes until `nbytes` have passed in all, then hold the rest."""
        with self._lock:
            self._pause_at = nbytes

    def hold_links_after(self, nbytes: int) -> None:
        """Hold each connection's server bytes once it alone has sent `nbytes`; the others keep flowing.

        For a transfer paused midway while other clients' small calls still pass (a fleet
        replica's listing while another's download is held): pause_after counts every
        connection, so whichever is first past the mark is held, small calls included.
        """
        with self._lock:
            self._link_cap = nbytes

    def resume(self) -> None:
        """Forward everything from now on."""
        with self._lock:
            self._pause_at = self._link_cap = None
            self.paused.clear()
            self._flowing.set()

    def sever(self) -> None:
        """Drop every live connection (new ones are still accepted)."""
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()

    def close(self) -> None:
        self._closed.set()
        self._flowing.set()
        self.sever()
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=self._guard, args=(target, *args), daemon=True, name="fault-proxy")
        self._threads.append(thread)
        thread.start()

    def _guard(self, target: Callable[..., None], *args: object) -> None:
        try:
            target(*args)
        except BaseException as e:
            self.errors.append(e)

    def _accept_loop(self) -> None:
        deadline = time.monotonic() + MAX_PROXY_SECONDS
        while not self._closed.is_set() and time.monotonic() < deadline:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # listener closed
            try:
                upstream = socket.create_connection((HOST, self.upstream_port), timeout=2)
            except OSError:
                client.close()  # the server is down: the client sees the connection drop
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(POLL_SECONDS)
            link = _Link(client, upstream)
            with self._lock:
                self._links.append(link)
                self.connections += 1
            parser = self.corruptor.parser() if self.corruptor else None
            self._spawn(self._pump, link, client, upstream, None, deadline)
            self._spawn(self._pump, link, upstream, client, parser, deadline)

    def _pump(
        self,
        link: _Link,
        src: socket.socket,
        dst: socket.socket,
        parser: _Http2Parser | None,
        deadline: float,
    ) -> None:
        to_client = dst is link.client
        try:
            while not link.closed.is_set() and time.monotonic() < deadline:
                try:
                    data = bytearray(src.recv(256 * 1024))
                except TimeoutError:
                    continue
                if not data:
                    return
                if parser is not None:
                    parser.feed(data)
                if to_client:
                    self._send_to_client(link, data, deadline)
                else:
                    dst.sendall(data)
        except OSError:
            return
        finally:
            link.close()

    def _send_to_client(self, link: _Link, data: bytearray, deadline: float) -> None:
        view = memoryview(data)
        while view and not link.closed.is_set():
            with self._lock:
                allowed = len(view)
                if self._pause_at is not None:
                    allowed = max(0, min(allowed, self._pause_at - self.s2c_bytes))
                if self._link_cap is not None:
                    allowed = max(0, min(allowed, self._link_cap - link.s2c_bytes))
                if allowed == 0:
                    self._flowing.clear()
                    self.paused.set()
            if allowed == 0:
                if time.monotonic() > deadline:
                    raise OSError("proxy held bytes past its deadline")
                self._flowing.wait(POLL_SECONDS)
                continue
            link.client.sendall(view[:allowed])
            with self._lock:
                self.s2c_bytes += allowed
                link.s2c_bytes += allowed
            view = view[allowed:]


# ----------------------------------------------------------------- server process


class ServerProcess:
    """`weightserve serve` in a child process on a fixed loopback port."""

    def __init__(self, root: Path, port: int, log_dir: Path, *extra_args: str) -> None:
        self.root = root
        self.port = port
        self.address = f"{HOST}:{port}"
        self.log_dir = log_dir
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @staticmethod
    def executable() -> Path:
        exe = Path(sys.executable).with_name("weightserve")
        if not exe.exists():
            raise AssertionError(f"{exe} is missing: install the project into the venv (make venv)")
        return exe

    def start(self, timeout: float = 30.0) -> ServerProcess:
        """Start the server and wait until it reports SERVING."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        log = (self.log_dir / f"server-{self.port}-{self.starts}.log").open("wb")
        cmd = [str(self.executable()), "serve", "--model-root", str(self.root), "--listen", self.address]
        cmd += ["--metrics-listen", "127.0.0.1:0"]  # servers of concurrent tests must not share port 9400
        self.proc = subprocess.Popen([*cmd, *self.extra_args], stdout=log, stderr=subprocess.STDOUT, env=server_env())
        log.close()
        wait_serving(self.address, timeout, alive=self._why_dead)
        return self

    def start_after(self, gap: float, timeout: float = 30.0) -> Background:
        """Start the server `gap` seconds from now, on a thread: a restart that takes that long.

        The gap is the fault being injected (how long the server is away), not a wait for
        something to happen. `.result(timeout)` of the returned call re-raises a failed start.
        """
        away = threading.Event()  # never set: wait() is the gap
        return Background(lambda: (away.wait(gap), self.start(timeout)))

    def _why_dead(self) -> str | None:
        assert self.proc is not None
        rc = self.proc.poll()
        return None if rc is None else f"exit {rc}\n{self.log()}"

    def log(self) -> str:
        """Every run's output, oldest first."""
        parts = []
        for n in range(1, self.starts + 1):
            path = self.log_dir / f"server-{self.port}-{n}.log"
            if path.exists():
                parts.append(f"--- run {n} ---\n{path.read_text(errors='replace')}")
        return "\n".join(parts)

    def kill(self) -> None:
        """SIGKILL and reap."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def terminate(self) -> None:
        """SIGTERM: the server starts draining."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """Kill whatever is still running (fixture teardown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def server_env() -> dict[str, str]:
    """The environment for a child server: ours, without WEIGHTSERVE_* settings that would change it."""
    return {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSERVE_")}


# ------------------------------------------------------------------- threads


class Background:
    """A call running on a daemon thread; `result(timeout)` re-raises what it raised."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self._fn = fn
        self._done = threading.Event()
        self._value: object = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="background-call")
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as e:
            self._error = e
        finally:
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float) -> object:
        if not self._done.wait(timeout):
            raise AssertionError(f"call still running after {timeout}s")
        if self._error is not None:
            raise self._error
        return self._value


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.01) -> None:
    """Poll `predicate` until it holds, at most `timeout` seconds; fail naming `what`."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 1):
        if predicate():
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
