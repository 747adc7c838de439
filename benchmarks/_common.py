"""Helpers the benchmarks share: a cached checkpoint, subprocess servers, RSS sampling."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import psutil

from weightserve.testing import LlamaShape, write_llama_checkpoint

BENCH_SHAPE = LlamaShape(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=9,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=32000,
)
"""About 1.07 GB of bf16."""


LOAD_SHAPES = (
    LlamaShape(hidden_size=256, intermediate_size=688, num_hidden_layers=1, num_attention_heads=8,
               num_key_value_heads=4, vocab_size=2048),
    LlamaShape(hidden_size=1024, intermediate_size=2816, num_hidden_layers=1, num_attention_heads=16,
               num_key_value_heads=4, vocab_size=16000),
)  # fmt: skip
"""Llama families that `llama_shape_of_size` scales by layer count: ~2 MB + 1.45 MB a layer, ~66 MB + 22.5 MB."""


def llama_bytes(shape: LlamaShape) -> int:
    """Bytes of a bf16 checkpoint of `shape`."""
    from weightserve.testing import llama_tensor_shapes

    return 2 * sum(math.prod(size) for size in llama_tensor_shapes(shape).values())


def llama_shape_of_size(nbytes: int) -> LlamaShape:
    """A Llama shape of about `nbytes` of bf16 (splittable up to world size 8): the largest family
    whose one-layer model fits, with as many layers as bring it closest."""
    family = next((s for s in reversed(LOAD_SHAPES) if llama_bytes(s) <= nbytes), LOAD_SHAPES[0])
    fixed = llama_bytes(replace(family, num_hidden_layers=0))
    per_layer = llama_bytes(family) - fixed
    return replace(family, num_hidden_layers=max(1, round((nbytes - fixed) / per_layer)))


def percentile(values: list[float], q: float) -> float:
    """The `q`-th percentile (0-100) of `values`, nearest rank; NaN when there are none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def drop_page_cache(paths: Iterable[Path]) -> bool:
    """Ask the kernel to forget these files' pages (cold-cache runs; no root needed); False where it cannot.

    Dirty pages are written back first: DONTNEED drops only clean ones.
    """
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def bench_root() -> Path:
    env = os.environ.get("WEIGHTSERVE_BENCH_DIR")
    return Path(env) if env else Path.home() / ".cache" / "weightserve" / "bench"


def ensure_checkpoint(root: Path, name: str = "bench/llama-1g", shape: LlamaShape = BENCH_SHAPE) -> Path:
    """Write the benchmark checkpoint once; the marker file is written last."""
    model_dir = root / name
    marker = model_dir / ".complete"
    if not marker.is_file():
        write_llama_checkpoint(model_dir, shape, num_files=2)
        marker.write_text("ok\n")
    return model_dir


def serve_command(root: Path, address: str, *extra: str) -> list[str]:
    """`weightserve serve` over `root` on `address`, quiet, with `extra` flags.

    Its metrics side port takes a free port (unless `extra` says otherwise), so a
    benchmark can run several servers at once.
    """
    metrics = [] if "--metrics-listen" in extra else ["--metrics-listen", "127.0.0.1:0"]
    return [
        sys.executable, "-m", "weightserve.cli", "serve", "--model-root", str(root),
        "--listen", address, "--log-level", "WARNING", *metrics, *extra,
    ]  # fmt: skip


def print_table(rows: list[tuple[str, str]]) -> None:
    """Two aligned columns on stdout."""
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        sys.stdout.write(f"{key:<{width}}  {value}\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(address: str, timeout: float = 60.0, credentials: grpc.ChannelCredentials | None = None) -> None:
    """Poll until a channel to `address` connects (over TLS with `credentials`)."""
    deadline = time.monotonic() + timeout
    channel = grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
    with channel:
        while True:
            try:
                grpc.channel_ready_future(channel).result(timeout=1.0)
                return
            except grpc.FutureTimeoutError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"server at {address} not ready after {timeout}s") from None


@contextlib.contextmanager
def subprocess_server(
    args: list[str], address: str, credentials: grpc.ChannelCredentials | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server process until the block ends."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_ready(address, credentials=credentials)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_worker(script: Path, *args: str) -> dict[str, float]:
    """Run `python script --worker ...` and parse the JSON line it prints."""
    out = subprocess.run([sys.executable, str(script), "--worker", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


class RssSampler:
    """Samples a process's RSS (anonymous and file-backed mapped pages) on a thread."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.before = self.process.memory_info().rss
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.before


def current_rss() -> int:
    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """Peak RSS of this process so far (ru_maxrss is KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class CpuUsed:
    """CPU seconds (user + system) a process spent inside a `server_cpu` block."""

    seconds: float = 0.0


@contextlib.contextmanager
def server_cpu(pid: int) -> Iterator[CpuUsed]:
    """Measure the CPU seconds process `pid` (and its threads) uses during the block."""
    import psutil

    process = psutil.Process(pid)
    used = CpuUsed()
    before = process.cpu_times()
    try:
        yield used
    finally:
        after = process.cpu_times()
        used.seconds = (after.user - before.user) + (after.system - before.system)
