"""weightserve against its peers on one checkpoint, and how its cost grows.

Prints, from one run on the ~1 GiB bf16 bench checkpoint, for each contender: time
until the worker holds a CPU state dict with every page of every tensor touched once,
as throughput (median of --repeat runs, contenders alternated, each run a fresh
process), peak RSS growth over the state dict, and weightserve's throughput over the
contender's, for the gRPC path and for shared memory:

  - raw gRPC byte streaming (identity serializers, 4 MiB messages, into one buffer);
  - weightserve over gRPC: TCP loopback, and a Unix socket (transport="grpc");
  - weightserve over shared memory: views, and copy=True;
  - safetensors load_file + copy;
  - tensorizer from its own file, and over HTTP from a local nginx (skipped, saying why,
    without nginx);
  - Run:ai Model Streamer (its tensors cloned: it reuses its buffers);
  - fastsafetensors on the CPU.

Peers come from the `bench` extra (pip install 'weightserve[bench]'); a missing one is
skipped with the reason. The weightserve servers keep the model in memory
(--cache-memory): the node-local deployment a fleet fetches from. With --cold a second
pass drops the checkpoint files from the page cache (posix_fadvise DONTNEED) before
every run and fetches from servers without a memory cache.

--readme rewrites the block between `<!-- peers:begin -->` and `<!-- peers:end -->` in
README.md with the table and the machine it ran on. --scaling prints throughput against
checkpoint size (256 MiB up to --max-size), against world size (--world-sizes ranks
fetched at once, both transports) and per-tensor overhead (10,000 tensors of 4 KiB
against 10 of 4 MiB, also over packed gRPC chunks); --per-tensor prints only the last.
--short runs only the in-process contenders on a tiny checkpoint
(what tests/benchmarks/test_peers.py checks the table-writing with).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    LOAD_SHAPES,
    RssSampler,
    bench_root,
    current_rss,
    drop_page_cache,
    ensure_checkpoint,
    free_port,
    llama_shape_of_size,
    peak_rss,
    serve_command,
    subprocess_server,
)

MODEL = "bench/llama-1g"
SHORT_MODEL = "bench/peers-tiny"
README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- peers:begin -->", "<!-- peers:end -->"
PAGE = 4096
MiB, GiB = 1 << 20, 1 << 30
SMALL_TENSORS, SMALL_BYTES = 10_000, 4 * 1024
LARGE_TENSORS = 10
TARGET_GRPC_VS_NGINX, TARGET_SHM_VS_SAFETENSORS, TARGET_SMALL_SHM, GRPC_SMALL_FLOOR = 1.3, 2.0, 0.5, 0.2


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    in_process: bool = False
    """Runs in --short (needs nothing but weightserve and safetensors)."""
    cold: bool = True
    """Has a cold-cache figure (raw gRPC streams a constant: it has none)."""


CONTENDERS = (
    Contender("raw", "raw gRPC bytes (ceiling)", cold=False),
    Contender("ws-tcp", "weightserve gRPC, TCP", in_process=True),
    Contender("ws-tcp-before", "weightserve gRPC, TCP, receive path before the arena (--before)"),
    Contender("ws-unix", "weightserve gRPC, Unix socket", in_process=True),
    Contender("ws-shm", "weightserve shared memory, views", in_process=True),
    Contender("ws-shm-copy", "weightserve shared memory, copy=True", in_process=True),
    Contender("safetensors", "safetensors load_file + copy", in_process=True),
    Contender("tensorizer", "tensorizer, own file"),
    Contender("tensorizer-http", "tensorizer, HTTP from nginx"),
    Contender("runai", "Run:ai Model Streamer"),
    Contender("fastsafetensors", "fastsafetensors, CPU"),
)
GRPC_REF, SHM_REF = "ws-tcp", "ws-shm"


# --------------------------------------------------------------------- loading


def touch(state: dict[str, Any]) -> int:
    """Read one byte of every page of every tensor, so nothing is left to fault in later.

    Tensors lying back to back (views of one buffer) are touched as one range, so the
    harness costs the same per page whatever the tensor count; only the loader's own
    per-tensor cost shows.
    """
    import ctypes

    import numpy as np

    tensors = [t for t in state.values() if t.nbytes]
    if not tensors:
        return 0
    starts = np.fromiter((t.data_ptr() for t in tensors), np.int64, len(tensors))
    ends = starts + np.fromiter((t.nbytes for t in tensors), np.int64, len(tensors))
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], np.maximum.accumulate(ends[order])
    # a new range wherever a tensor starts more than a cache line past everything before it
    breaks = np.flatnonzero(starts[1:] > ends[:-1] + 64) + 1
    total = 0
    for start, end in zip(starts[np.r_[0, breaks]], ends[np.r_[breaks - 1, len(starts) - 1]], strict=True):
        span = np.ctypeslib.as_array((ctypes.c_uint8 * int(end - start)).from_address(int(start)))
        total += int(span[::PAGE].sum()) + int(span[-1])
    return total


def nbytes_of(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def load_weightserve(spec: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    from weightserve.client import WeightClient

    client = WeightClient(spec["address"])
    client.list_models()  # connect first: time the fetch, not the handshake
    options = {k: spec[k] for k in ("transport", "copy", "rank", "world_size") if k in spec}
    return lambda: client.fetch_state_dict(spec["model"], **options)


def load_raw(spec: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    import grpc
    import numpy as np
    import torch
    from fetch_throughput import MESSAGE, RAW_METHOD

    channel = grpc.insecure_channel(spec["address"], options=[("grpc.max_receive_message_length", 8 * MESSAGE)])
    grpc.channel_ready_future(channel).result(timeout=30)
    call = channel.unary_stream(RAW_METHOD)

    def load() -> dict[str, Any]:
        dest = torch.empty(spec["bytes"], dtype=torch.uint8)
        flat, offset = dest.numpy(), 0
        for message in call(b""):
            flat[offset : offset + len(message)] = np.frombuffer(message, dtype=np.uint8)
            offset += len(message)
        return {"bytes": dest}

    return load


def load_safetensors(spec: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    def load() -> dict[str, Any]:
        import torch
        from safetensors.torch import load_file

        out = {}
        for path in spec["files"]:
            for name, tensor in load_file(path).items():
                copy = torch.empty_like(tensor)
                copy.copy_(tensor)
                out[name] = copy
        return out

    return load


def load_tensorizer(spec: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    def load() -> dict[str, Any]:
        from tensorizer import TensorDeserializer

        with TensorDeserializer(spec["source"], device="cpu") as deserializer:
            return dict(deserializer.items())

    return load


def load_runai(spec: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    def load() -> dict[str, Any]:
        from runai_model_streamer import SafetensorsStreamer

        out = {}
        with SafetensorsStreamer() as streamer:
            streamer.stream_files(spec["files"])
            for name, tensor in streamer.get_tensors():
                out[name] = tensor.clone()  # its buffers are reused for the next tensors
        return out

    return load


def load_fastsafetensors(spec: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    def load() -> dict[str, Any]:
        import fastsafetensors as fst

        loader = fst.SafeTensorsFileLoader(None, "cpu", nogds=True, set_numa=False)
        out = {}
        try:
            loader.add_filenames({0: spec["files"]})
            buffers = loader.copy_files_to_device()
            try:
                for name in buffers.key_to_rank_lidx:
                    out[name] = buffers.get_tensor(name)  # they outlive buffers.close()
            finally:
                buffers.close()
        finally:
            loader.close()
        return out

    return load


def load_weightserve_before(spec: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    """The gRPC receive path as it was: a torch.empty per tensor, glibc's malloc thresholds left alone."""
    from weightserve.client import assembly

    assembly.TUNE_MALLOC = False

    def no_arena(session: assembly.FetchSession) -> None:
        session._arena_bytes = 0  # every tensor then gets its own torch.empty

    assembly.FetchSession._plan_arena = no_arena  # type: ignore[method-assign]
    return load_weightserve(spec)


LOADERS: dict[str, Callable[[dict[str, Any]], Callable[[], dict[str, Any]]]] = {
    "raw": load_raw,
    "ws-tcp": load_weightserve,
    "ws-tcp-before": load_weightserve_before,
    "ws-unix": load_weightserve,
    "ws-shm": load_weightserve,
    "ws-shm-copy": load_weightserve,
    "safetensors": load_safetensors,
    "tensorizer": load_tensorizer,
    "tensorizer-http": load_tensorizer,
    "runai": load_runai,
    "fastsafetensors": load_fastsafetensors,
}


def measure(kind: str, spec: dict[str, Any], fresh_process: bool) -> dict[str, float]:
    """Load once: seconds until every page is touched, bytes, peak RSS growth."""
    load = LOADERS[kind](spec)
    if "go" in spec:  # a rank of a world-size run: wait for the others to be ready
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        sys.stdin.readline()
    import torch

    touch({"warm-up": torch.zeros(2 * PAGE, dtype=torch.uint8)})  # its first call costs ~30 ms (lazy imports)
    before = current_rss()
    with RssSampler(os.getpid()) as sampler:
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        started = time.time()
        state = load()
        touch(state)
        ended = time.time()
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    growth = peak_rss() - before if fresh_process else sampler.growth
    used = cpu_after.ru_utime - cpu.ru_utime + cpu_after.ru_stime - cpu.ru_stime
    return {
        "seconds": ended - started,
        "bytes": nbytes_of(state),
        "cpu": used,
        "rss_growth": max(growth, sampler.growth),
        "started": started,
        "ended": ended,
    }


# ---------------------------------------------------------------------- peers


def missing_peer(kind: str) -> str | None:
    """Why a contender cannot run here, or None."""
    module = {"tensorizer": "tensorizer", "tensorizer-http": "tensorizer", "runai": "runai_model_streamer",
              "fastsafetensors": "fastsafetensors"}.get(kind)  # fmt: skip
    if module is None:
        return None
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed (pip install 'weightserve[bench]')"
    if kind == "tensorizer-http":
        if nginx_binary() is None:
            return "nginx is not installed (apt-get install nginx)"
        if shutil.which("curl") is None:
            return "tensorizer streams HTTP through curl, which is not installed"
    return None


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


def tensorizer_file(model_dir: Path) -> Path:
    """The checkpoint serialized by tensorizer once, beside the safetensors files."""
    path = model_dir / "tensorizer" / "model.tensors"
    if not path.is_file():
        import torch
        from safetensors.torch import load_file
        from tensorizer import TensorSerializer

        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(".tmp")
        state: dict[str, torch.Tensor] = {}
        for file in sorted(model_dir.glob("*.safetensors")):
            state.update(load_file(file))
        serializer = TensorSerializer(str(tmp))
        serializer.write_state_dict(state)
        serializer.close()
        tmp.rename(path)
    return path


@contextlib.contextmanager
def nginx_serving(directory: Path) -> Iterator[str]:
    """A local nginx serving `directory`; yields its base URL."""
    binary = nginx_binary()
    assert binary is not None
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="peers-nginx-") as tmp:
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(
            f"daemon off;\nmaster_process off;\nworker_processes 1;\nerror_log {tmp}/error.log;\npid {tmp}/nginx.pid;\n"
            "events { worker_connections 64; }\n"
            f"http {{ access_log off; sendfile on; client_body_temp_path {tmp}; proxy_temp_path {tmp};\n"
            f"  fastcgi_temp_path {tmp}; uwsgi_temp_path {tmp}; scgi_temp_path {tmp};\n"
            f"  server {{ listen 127.0.0.1:{port}; root {directory}; }} }}\n"
        )
        proc = subprocess.Popen([binary, "-c", str(conf), "-p", tmp], stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    import socket

                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        why = proc.stderr.read() if proc.stderr and proc.poll() is not None else "no answer"
                        raise RuntimeError(f"nginx did not start: {why!r}") from None
                    time.sleep(0.05)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(timeout=10)


# ------------------------------------------------------------------- workers


def run_worker(kind: str, spec: dict[str, Any]) -> dict[str, float]:
    """One load in a fresh process."""
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(spec)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run_ranks(kind: str, specs: list[dict[str, Any]]) -> dict[str, float]:
    """Several workers at once, released together once all are connected: aggregate throughput."""
    script = str(Path(__file__).resolve())
    procs = [
        subprocess.Popen(
            [sys.executable, script, "--worker", kind, json.dumps({**spec, "go": True})],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for spec in specs
    ]
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"rank worker did not start: {line!r}")
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode:
            raise RuntimeError(f"rank worker failed ({proc.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    seconds = max(r["ended"] for r in results) - min(r["started"] for r in results)
    return {"seconds": seconds, "bytes": sum(r["bytes"] for r in results)}


def gbps(result: dict[str, float]) -> float:
    return result["bytes"] / result["seconds"] / 1e9


# --------------------------------------------------------------------- servers


@dataclass
class Setup:
    """Where each contender gets its bytes from."""

    root: Path
    model: str
    model_dir: Path
    total: int
    specs: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    cold_files: list[Path] = field(default_factory=list)


@contextlib.contextmanager
def servers(setup: Setup, tmp: Path, *, cached: bool, short: bool) -> Iterator[dict[str, str]]:
    """A weightserve server on TCP and one on a Unix socket (subprocesses; in-process with `short`)."""
    memory = 3 * setup.total + 64 * MiB if cached else 0
    tcp = f"127.0.0.1:{free_port()}"
    unix = f"unix:{tmp / ('ws-cached.sock' if cached else 'ws.sock')}"
    if short:
        from weightserve.config import ServerConfig
        from weightserve.testing import BackgroundServer

        def config(listen: str) -> ServerConfig:
            return ServerConfig(model_roots=(setup.root,), listen=listen, metrics_listen="off", cache_memory=memory)

        with BackgroundServer(config("127.0.0.1:0")) as tcp_server, BackgroundServer(config(unix)) as unix_server:
            yield {"tcp": tcp_server.address, "unix": unix_server.address}
        return
    extra = ["--metrics-listen", "off", "--cache-memory", str(memory)]
    with (
        subprocess_server(serve_command(setup.root, tcp, *extra), tcp),
        subprocess_server(serve_command(setup.root, unix, *extra), unix),
    ):
        yield {"tcp": tcp, "unix": unix}


def weightserve_specs(setup: Setup, addresses: dict[str, str]) -> dict[str, dict[str, Any]]:
    return {
        "ws-tcp": {"address": addresses["tcp"], "model": setup.model, "transport": "grpc"},
        "ws-tcp-before": {"address": addresses["tcp"], "model": setup.model, "transport": "grpc"},
        "ws-unix": {"address": addresses["unix"], "model": setup.model, "transport": "grpc"},
        "ws-shm": {"address": addresses["unix"], "model": setup.model, "transport": "shm"},
        "ws-shm-copy": {"address": addresses["unix"], "model": setup.model, "transport": "shm", "copy": True},
    }


# ---------------------------------------------------------------------- table


@dataclass
class Row:
    contender: Contender
    warm: list[dict[str, float]] = field(default_factory=list)
    cold: list[dict[str, float]] = field(default_factory=list)
    skipped: str = ""

    def rate(self, which: str = "warm") -> float | None:
        runs = self.warm if which == "warm" else self.cold
        return median(gbps(r) for r in runs) if runs else None

    def cpu(self) -> float | None:
        """The client's CPU seconds (all its threads, user + system) per GB."""
        return median(r["cpu"] / (r["bytes"] / 1e9) for r in self.warm) if self.warm else None

    def rss(self) -> float | None:
        return median(r["rss_growth"] / r["bytes"] for r in self.warm) if self.warm else None


def machine() -> str:
    """One line: CPU, cores, memory, kernel, Python, torch."""
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        if found:
            cpu = found.group(1).strip()
    return (
        f"{cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / GiB:.0f} GiB RAM, "
        f"Linux {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}"
    )


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def fmt_rate(value: float | None) -> str:
    """GB/s: two decimals, or two significant figures below 0.1 (a tiny checkpoint's never reads 0.00)."""
    return fmt(value, ".2f" if value is None or value >= 0.095 else ".2g")


def table(rows: list[Row], total: int, model: str, repeat: int, cold: bool, short: bool) -> list[str]:
    """The peers table as Markdown lines (what --readme writes and what is printed)."""
    by_key = {row.contender.key: row for row in rows}
    grpc, shm = by_key[GRPC_REF].rate(), by_key[SHM_REF].rate()
    head = (
        "| contender | GB/s warm | GB/s cold | client CPU s/GB | peak RSS growth / state dict "
        "| weightserve gRPC ÷ it | weightserve shm ÷ it |"
    )
    lines = [
        f"Checkpoint: {model}, {total / 1e6:.1f} MB bf16. Machine: {machine()}. Median of {repeat} runs per "
        f"contender, alternated, {'in one process' if short else 'each a fresh process'}; "
        "time until every page of every tensor is touched once; "
        f"{'warm and cold page cache' if cold else 'warm page cache (no cold pass)'}.",
        "",
        head,
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        label = row.contender.label
        if row.skipped:
            lines.append(f"| {label} | skipped: {row.skipped} | | | | | |")
            continue
        rate = row.rate()
        ratio_grpc = grpc / rate if grpc and rate else None
        ratio_shm = shm / rate if shm and rate else None
        lines.append(
            f"| {label} | {fmt_rate(rate)} | {fmt_rate(row.rate('cold'))} | {fmt(row.cpu())} | {fmt(row.rss())} | "
            f"{fmt(ratio_grpc)} | {fmt(ratio_shm)} |"
        )
    return lines


def targets(rows: list[Row]) -> list[tuple[str, float | None, float]]:
    """(name, value, target) for the issue's targets that this run can check."""
    by_key = {row.contender.key: row for row in rows}

    def ratio(a: str, b: str) -> float | None:
        x, y = by_key[a].rate(), by_key[b].rate()
        return x / y if x and y else None

    return [
        ("weightserve gRPC (TCP) / tensorizer over nginx", ratio("ws-tcp", "tensorizer-http"), TARGET_GRPC_VS_NGINX),
        ("weightserve shm views / safetensors + copy", ratio("ws-shm", "safetensors"), TARGET_SHM_VS_SAFETENSORS),
        ("weightserve shm copy=True / safetensors + copy", ratio("ws-shm-copy", "safetensors"), 1.0),
    ]


def write_readme(path: Path, lines: list[str], command: str) -> None:
    """Replace what is between the peers markers in `path` (the markers stay)."""
    text = path.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{path}: needs exactly one {BEGIN} ... {END} block")
    before, rest = text.split(BEGIN)
    _, after = rest.split(END)
    note = f"<!-- written by `{command}`; do not edit by hand -->"
    block = "\n".join([BEGIN, note, "", *lines, "", END])
    path.write_text(before + block + after)


# ----------------------------------------------------------------------- runs


def prepare(args: argparse.Namespace, root: Path, tmp: Path, stack: contextlib.ExitStack) -> Setup:
    """The checkpoint, the peers' inputs and (full runs) the raw and nginx servers."""
    if args.short:
        model, model_dir = SHORT_MODEL, ensure_checkpoint(root, SHORT_MODEL, LOAD_SHAPES[0])
    else:
        model, model_dir = MODEL, ensure_checkpoint(root)
    files = sorted(model_dir.glob("*.safetensors"))
    setup = Setup(root, model, model_dir, sum(p.stat().st_size for p in files))
    setup.cold_files = list(files)
    names = [str(p) for p in files]
    setup.specs["safetensors"] = {"files": names}
    for contender in CONTENDERS:
        if contender.key == "ws-tcp-before" and not args.before:
            continue
        if args.short and not contender.in_process:
            setup.skipped[contender.key] = "--short runs the in-process contenders only"
        elif (why := missing_peer(contender.key)) is not None:
            setup.skipped[contender.key] = why
    if args.short:
        return setup
    raw_port = free_port()
    raw_cmd = [sys.executable, str(Path(__file__).resolve().parent / "fetch_throughput.py"),
               "--worker", "raw-server", str(raw_port), str(setup.total)]  # fmt: skip
    stack.enter_context(subprocess_server(raw_cmd, f"127.0.0.1:{raw_port}"))
    setup.specs["raw"] = {"address": f"127.0.0.1:{raw_port}", "bytes": setup.total}
    setup.specs["runai"] = {"files": names}
    setup.specs["fastsafetensors"] = {"files": names}
    if "tensorizer" not in setup.skipped:
        tensors = tensorizer_file(model_dir)
        setup.cold_files.append(tensors)
        setup.specs["tensorizer"] = {"source": str(tensors)}
        if "tensorizer-http" not in setup.skipped:
            try:
                url = stack.enter_context(nginx_serving(tensors.parent))
                setup.specs["tensorizer-http"] = {"source": f"{url}/{tensors.name}"}
            except RuntimeError as e:
                setup.skipped["tensorizer-http"] = str(e).splitlines()[0]
    return setup


def run_pass(setup: Setup, rows: list[Row], args: argparse.Namespace, cold: bool) -> None:
    """--repeat rounds, every contender once a round, the order rotated each round."""
    live = [row for row in rows if not row.skipped and (row.contender.cold or not cold)]
    warmup = 0 if cold or args.short else 1  # a full warm pass: round 0 fills the caches, uncounted
    for round_ in range(args.repeat + warmup):
        shift = round_ % max(len(live), 1)
        for row in list(live[shift:] + live[:shift]):
            if row not in live:
                continue
            key = row.contender.key
            if cold:
                drop_page_cache(setup.cold_files)
            spec = setup.specs[key]
            try:
                result = measure(key, spec, fresh_process=False) if args.short else run_worker(key, spec)
            except subprocess.CalledProcessError as e:  # a peer that fails here is reported, not fatal
                row.skipped = "failed: " + ((e.stderr or "").strip().splitlines() or ["?"])[-1][:200]
                live.remove(row)
                continue
            if cold:
                row.cold.append(result)
            elif round_ >= warmup:
                row.warm.append(result)
            sys.stderr.write(f"  {'cold' if cold else 'warm'} {row.contender.label}: {gbps(result):.2f} GB/s\n")


def peers(args: argparse.Namespace) -> int:
    root = bench_root()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="peers-")))
        setup = prepare(args, root, tmp, stack)
        rows = [
            Row(c, skipped=setup.skipped.get(c.key, ""))
            for c in CONTENDERS
            if c.key != "ws-tcp-before" or (args.before and not args.short)
        ]
        with servers(setup, tmp, cached=True, short=args.short) as addresses:
            setup.specs.update(weightserve_specs(setup, addresses))
            run_pass(setup, rows, args, cold=False)
        if args.cold:
            with servers(setup, tmp, cached=False, short=args.short) as addresses:
                setup.specs.update(weightserve_specs(setup, addresses))
                run_pass(setup, rows, args, cold=True)
    lines = table(rows, setup.total, setup.model, args.repeat, args.cold, args.short)
    sys.stdout.write("\n".join(lines) + "\n\n")
    for name, value, target in targets(rows):
        sys.stdout.write(f"{name}: {fmt(value)}  (target >= {target})\n")
    before = {row.contender.key: row for row in rows}.get("ws-tcp-before")
    if before is not None and before.warm:
        grpc = next(row for row in rows if row.contender.key == GRPC_REF)
        sys.stdout.write(
            f"gRPC receive path, before -> now: {fmt(before.rate())} -> {fmt(grpc.rate())} GB/s, "
            f"client CPU {fmt(before.cpu())} -> {fmt(grpc.cpu())} s/GB\n"
        )
    if args.readme:
        command = "python benchmarks/peers.py " + " ".join(a for a in sys.argv[1:] if not a.startswith("/"))
        write_readme(Path(args.readme), lines, command.strip())
        sys.stdout.write(f"wrote the table into {args.readme}\n")
    return 0


# -------------------------------------------------------------------- scaling


def sized_models(root: Path, max_size: int) -> list[tuple[str, int]]:
    """Checkpoints of 256 MiB, 512 MiB, ... up to `max_size`, written once."""
    out = []
    size = 256 * MiB
    while size <= max_size:
        name = f"bench/size-{size // MiB}m"
        model_dir = ensure_checkpoint(root, name, llama_shape_of_size(size))
        out.append((name, sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))))
        size *= 2
    return out


def tensor_count_models(root: Path) -> dict[str, tuple[str, int]]:
    """10,000 tensors of 4 KiB and 10 of 4 MiB: the same 40 MiB of bf16."""
    import torch

    from weightserve.testing import write_sharded_safetensors

    out = {}
    for label, count in (("small", SMALL_TENSORS), ("large", LARGE_TENSORS)):
        name = f"bench/tensors-{count}"
        model_dir = root / name
        each = SMALL_TENSORS * SMALL_BYTES // count // 2  # bf16 elements per tensor
        if not (model_dir / ".complete").is_file():
            generator = torch.Generator().manual_seed(count)
            tensors = {f"t.{i}.weight": torch.randn(each, generator=generator).to(torch.bfloat16) for i in range(count)}
            model_dir.mkdir(parents=True, exist_ok=True)
            write_sharded_safetensors(tensors, model_dir, num_files=1)
            (model_dir / ".complete").write_text("ok\n")
        out[label] = (name, count)
    return out


def scaling(args: argparse.Namespace) -> int:
    """Throughput against checkpoint size and world size, and the per-tensor overhead (only that with --per-tensor)."""
    root = bench_root()
    sizes = [] if args.per_tensor else sized_models(root, args.max_size)
    counts = tensor_count_models(root)
    biggest = max([s for _, s in sizes] + [llama_bytes_on_disk(root / MODEL) if (root / MODEL).is_dir() else 0])
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        model_dir = ensure_checkpoint(root)
        total = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
        setup = Setup(root, MODEL, model_dir, max(biggest, total))
        with servers(setup, Path(tmp), cached=True, short=False) as addresses:
            transports = {"gRPC (TCP)": {"address": addresses["tcp"], "transport": "grpc"},
                          "shared memory": {"address": addresses["unix"], "transport": "shm"}}  # fmt: skip
            if not args.per_tensor:
                size_scaling(sizes, transports, args.repeat)
                world_scaling(args.world_sizes, transports, args.repeat)
            packed = {"address": addresses["tcp"], "transport": "packed"}
            per_tensor(counts, {**transports, "gRPC packed (TCP)": packed}, args.repeat)
    return 0


def rate(name: str, transport: dict[str, Any], repeat: int) -> float:
    """Median GB/s of fetching `name` over `transport`; NaN (the reason on stderr) when the fetch fails."""
    spec = {**transport, "model": name}
    try:
        run_worker("ws-tcp", spec)  # warm the server's cache
        return median(gbps(run_worker("ws-tcp", spec)) for _ in range(repeat))
    except subprocess.CalledProcessError as e:
        reason = ((e.stderr or "").strip().splitlines() or ["?"])[-1]
        sys.stderr.write(f"  {name} over {transport['transport']} failed: {reason}\n")
        return float("nan")


def size_scaling(sizes: list[tuple[str, int]], transports: dict[str, dict[str, Any]], repeat: int) -> None:
    sys.stdout.write("throughput against checkpoint size (GB/s)\n")
    sys.stdout.write(f"{'size':>10}  " + "  ".join(f"{t:>14}" for t in transports) + "\n")
    for name, nbytes in sizes:
        figures = [rate(name, t, repeat) for t in transports.values()]
        sys.stdout.write(f"{nbytes / GiB:>8.2f} G  " + "  ".join(f"{f:>14.2f}" for f in figures) + "\n")


def world_scaling(worlds: list[int], transports: dict[str, dict[str, Any]], repeat: int) -> None:
    sys.stdout.write(f"\naggregate throughput against world size, {MODEL} (GB/s, all ranks at once)\n")
    sys.stdout.write(f"{'ranks':>10}  " + "  ".join(f"{t:>14}" for t in transports) + "\n")
    for world in worlds:
        figures = []
        for transport in transports.values():
            specs = [{**transport, "model": MODEL, "rank": r, "world_size": world} for r in range(world)]
            run_ranks("ws-tcp", specs)  # warm: the per-rank slices into the server's cache
            figures.append(median(gbps(run_ranks("ws-tcp", specs)) for _ in range(repeat)))
        sys.stdout.write(f"{world:>10}  " + "  ".join(f"{f:>14.2f}" for f in figures) + "\n")


def per_tensor(counts: dict[str, tuple[str, int]], transports: dict[str, dict[str, Any]], repeat: int) -> None:
    """The small-tensor checkpoint's throughput over the large one's, per transport."""
    sys.stdout.write(f"\nper-tensor overhead: {SMALL_TENSORS} tensors of 4 KiB vs {LARGE_TENSORS} of 4 MiB\n")
    for label, transport in transports.items():
        small = rate(counts["small"][0], transport, repeat)
        large = rate(counts["large"][0], transport, repeat)
        kind = transport["transport"]
        target = TARGET_SMALL_SHM if kind == "shm" else GRPC_SMALL_FLOOR
        note = f"target >= {target}" if kind != "grpc" else f"a message a tensor; packed when below {target}"
        sys.stdout.write(
            f"  {label}: small {small:.3f} GB/s, large {large:.3f} GB/s, ratio {small / large:.3f} ({note})\n"
        )


def llama_bytes_on_disk(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": MiB, "g": GiB}
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)i?b?", text.strip().lower())
    if not found:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 2GiB")
    return int(float(found.group(1)) * units.get(found.group(2), 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per contender (default 3)")
    parser.add_argument("--cold", action="store_true", help="add a cold page cache pass")
    parser.add_argument("--readme", nargs="?", const=str(README), help="rewrite the peers block of README.md")
    parser.add_argument("--before", action="store_true", help="add the gRPC receive path as it was before the arena")
    parser.add_argument("--short", action="store_true", help="tiny checkpoint, in-process contenders only")
    parser.add_argument("--scaling", action="store_true", help="throughput against size, world size, tensor count")
    parser.add_argument("--per-tensor", action="store_true", help="only the per-tensor overhead of --scaling")
    parser.add_argument("--max-size", type=parse_size, default=4 * GiB, help="largest checkpoint (default 4GiB)")
    parser.add_argument("--world-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, spec = args.worker
        sys.stdout.write(json.dumps(measure(kind, json.loads(spec), fresh_process=True)) + "\n")
        return 0
    if args.scaling or args.per_tensor:
        return scaling(args)
    return peers(args)


if __name__ == "__main__":
    sys.exit(main())
