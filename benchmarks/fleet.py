"""A fleet on loopback: R replicas, W worker processes, one counting S3 origin, one Redis.

R `weightserve serve` processes (each its own disk cache, as on R machines) share a
redis-server (`--coordination`) and an S3 origin (moto behind a proxy that counts the
bytes it sends). W worker processes start at once and each fetches a state dict through
`WeightClient("a,b,c")` (rendezvous routing). Four phases, each measured in this run:

- spread, cold: M models, worker w fetches model w % M (rank w % TP of TP), empty caches;
- spread, warm: the same again;
- hot, cold: one new model fetched by every worker (rank w % TP, one "node" per TP group);
- hot, warm: the same again.

For each phase it prints origin bytes over the bytes of the models asked for (1.0 is one
origin download per model, R is what uncoordinated replicas would cost), per-worker time to
state dict (p50, max), aggregate throughput (bytes delivered over the phase's span), how
the workers spread over the replicas, and the replicas' peak RSS. It then projects a
fleet from the measured per-replica and per-worker rates with the model in
docs/scaling.md (`project`), at a stated NIC bandwidth and model size.

Target: origin bytes over model bytes at most 1.05 cold and 0 warm (exit 1 otherwise).
Needs moto[server], redis (the Python client) and redis-server. `--short` runs small;
`--json PATH` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import free_port, llama_shape_of_size, percentile, print_table, serve_command, wait_ready

BUCKET = "bench-fleet"
GB = 1e9


# ----------------------------------------------------------------------------- origin


class CountingProxy:
    """A loopback TCP proxy that counts the bytes its upstream sends (the origin's egress)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.sent = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                if count:
                    with self._lock:
                        self.sent += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()


@contextmanager
def s3_origin(models: dict[str, Path]) -> Iterator[CountingProxy]:
    """moto's S3 with `models` uploaded under s3://bench-fleet/NAME/, behind a CountingProxy."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    s3 = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
    )
    s3.create_bucket(Bucket=BUCKET)
    for name, local in models.items():
        for path in sorted(local.iterdir()):
            s3.put_object(Bucket=BUCKET, Key=f"{name}/{path.name}", Body=path.read_bytes())
    proxy = CountingProxy(int(port))
    try:
        yield proxy
    finally:
        proxy.close()
        server.stop()


@contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server, or make test-deps as root)")
    port = free_port()
    cmd = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------- workers


def worker_main(args: argparse.Namespace) -> None:
    """One worker: fetch one share through the fleet and print what it took as one JSON line."""
    from weightserve.client import WeightClient

    with WeightClient(args.servers, timeout=300, spread_key=args.node, replicas_per_model=args.k) as client:
        started = time.time()
        state = client.fetch_state_dict(args.model, rank=args.rank, world_size=args.tp)
        ended = time.time()
        stats = client.last_fetch_stats
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    replica = stats.replica if stats is not None else ""
    print(json.dumps({"start": started, "end": ended, "bytes": nbytes, "replica": replica}))


def worker_command(servers: list[str], model: str, rank: int, tp: int, node: str, k: int) -> list[str]:
    return [
        sys.executable, __file__, "--worker", "--servers", ",".join(servers), "--model", model,
        "--rank", str(rank), "--tp", str(tp), "--node", node, "--k", str(k),
    ]  # fmt: skip


@dataclass
class Phase:
    name: str
    origin_ratio: float
    model_bytes: int
    worker_p50_s: float
    worker_max_s: float
    aggregate_gbps: float
    bytes_delivered: int
    per_replica_workers: dict[str, int]
    replica_peak_rss_mib: list[float]


def run_phase(
    name: str, servers: list[str], jobs: list[tuple[str, int, str]], tp: int, k: int, origin: CountingProxy,
    model_bytes: int, replica_pids: list[int],
) -> Phase:  # fmt: skip
    """Start one worker process per job (model, rank, node) at once; wait for all; measure."""
    import psutil

    before = origin.sent
    peaks = [psutil.Process(pid).memory_info().rss for pid in replica_pids]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            for i, pid in enumerate(replica_pids):
                peaks[i] = max(peaks[i], psutil.Process(pid).memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    procs = [
        subprocess.Popen(
            worker_command(servers, model, rank, tp, node, k), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for model, rank, node in jobs
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"a worker failed in phase {name}:\n{err}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    stop.set()
    sampler.join()
    seconds = [r["end"] - r["start"] for r in results]
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    delivered = sum(r["bytes"] for r in results)
    return Phase(
        name=name,
        origin_ratio=(origin.sent - before) / model_bytes,
        model_bytes=model_bytes,
        worker_p50_s=percentile(seconds, 50),
        worker_max_s=max(seconds),
        aggregate_gbps=delivered / span / GB,
        bytes_delivered=delivered,
        per_replica_workers=dict(Counter(r["replica"] for r in results)),
        replica_peak_rss_mib=[p / (1 << 20) for p in peaks],
    )


# ----------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Fleet:
    """A fleet to project (docs/scaling.md): sizes in bytes, rates in bytes per second."""

    replicas: int
    workers: int
    model_bytes: float = 140 * GB
    tp: int = 8
    origin_rate: float = 2.5 * GB
    """What one replica downloads from the origin at (S3 with many ranged GETs)."""
    replica_nic: float = 100e9 / 8
    """100 Gb/s."""
    worker_nic: float = 200e9 / 8 / 8
    """A 200 Gb/s node NIC shared by its 8 GPU workers."""
    replicas_per_model: int = 0
    """0: every replica (one hot model rolled out over the whole fleet)."""


@dataclass(frozen=True)
class Projection:
    origin_bytes: float
    origin_bytes_uncoordinated: float
    first_ready_s: float
    all_ready_s: float
    bottleneck: str


def project(fleet: Fleet, replica_rate: float, worker_rate: float) -> Projection:
    """Origin traffic and ready times of one model rolled out to every worker (docs/scaling.md).

    `replica_rate` and `worker_rate` are the measured ceilings of one replica's serving
    and one worker's receiving (CPU-bound gRPC); each side runs at the smaller of its
    ceiling and its NIC.
    """
    k = fleet.replicas_per_model or fleet.replicas
    serve = min(replica_rate, fleet.replica_nic)
    receive = min(worker_rate, fleet.worker_nic)
    share = fleet.model_bytes / fleet.tp
    download = fleet.model_bytes / fleet.origin_rate
    # The leaseholder then sends the model to k - 1 replicas; they copy while it serves.
    fill = (k - 1) * fleet.model_bytes / fleet.replica_nic if k > 1 else 0.0
    per_replica = fleet.workers * share / k
    phases = {
        "origin": download,
        "replica fill (leaseholder NIC)": fill,
        "replica serving (NIC or CPU)": per_replica / serve,
        "worker receive (NIC or CPU)": share / receive,
    }
    first = download + share / min(serve, receive)
    total = download + fill + max(per_replica / serve, share / receive)
    bottleneck = max(phases, key=lambda key: phases[key])
    return Projection(fleet.model_bytes, k * fleet.model_bytes, first, total, bottleneck)


# ----------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--servers", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--node", default="", help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--model-mib", type=int, default=48)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--replicas-per-model", type=int, default=2)
    parser.add_argument("--short", action="store_true", help="2 replicas, 4 workers, 2 models of 8 MiB")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return 0
    if args.short:
        args.replicas, args.workers, args.models, args.model_mib = 2, 4, 2, 8
    return run(args)


def run(args: argparse.Namespace) -> int:
    from weightserve.testing import write_llama_checkpoint

    shape = llama_shape_of_size(args.model_mib << 20)
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ws-fleet-")))
        local = {}
        for i in range(args.models + 1):  # the last one is the hot model
            write_llama_checkpoint(tmp / "src" / f"m{i}", shape, num_files=2, seed=i)
            local[f"m{i}"] = tmp / "src" / f"m{i}"
        sizes = {name: sum(p.stat().st_size for p in d.glob("*.safetensors")) for name, d in local.items()}
        origin = stack.enter_context(s3_origin(local))
        redis_url = stack.enter_context(redis_server(tmp))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WEIGHTSERVE_", "AWS_"))}
        env |= {
            "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{origin.port}", "AWS_EC2_METADATA_DISABLED": "true",
        }  # fmt: skip
        (tmp / "roots").mkdir()
        servers, pids = [], []
        for i in range(args.replicas):
            address = f"127.0.0.1:{free_port()}"
            cmd = serve_command(
                tmp / "roots", address, "--allow-source", f"s3://{BUCKET}/*", "--disk-cache-dir", str(tmp / f"d{i}"),
                "--coordination", redis_url, "--advertise", address,
            )  # fmt: skip
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            stack.callback(proc.wait)
            stack.callback(proc.terminate)
            servers.append(address)
            pids.append(proc.pid)
        for address in servers:
            wait_ready(address)

        tp, w, k = args.tp, args.workers, args.replicas_per_model
        spread = [(f"s3://{BUCKET}/m{i % args.models}", i % tp, f"node-{i // tp}") for i in range(w)]
        spread_bytes = sum(sizes[f"m{i}"] for i in range(min(args.models, w)))
        hot = [(f"s3://{BUCKET}/m{args.models}", i % tp, f"node-{i // tp}") for i in range(w)]
        hot_bytes = sizes[f"m{args.models}"]
        phases = [
            run_phase("spread, cold", servers, spread, tp, k, origin, spread_bytes, pids),
            run_phase("spread, warm", servers, spread, tp, k, origin, spread_bytes, pids),
            run_phase("hot, cold", servers, hot, tp, k, origin, hot_bytes, pids),
            run_phase("hot, warm", servers, hot, tp, k, origin, hot_bytes, pids),
        ]

    sys.stdout.write(
        f"fleet on loopback: {args.replicas} replicas, {w} workers (TP {tp}), {args.models} models of "
        f"{args.model_mib} MiB + 1 hot model, replicas_per_model {k}\n"
    )
    for phase in phases:
        sys.stdout.write(f"\n[{phase.name}]\n")
        print_table(
            [
                (
                    "origin bytes / model bytes",
                    f"{phase.origin_ratio:.2f}  (uncoordinated replicas: up to {args.replicas})",
                ),
                ("worker time to state dict", f"p50 {phase.worker_p50_s:.2f}s  max {phase.worker_max_s:.2f}s"),
                ("aggregate throughput", f"{phase.aggregate_gbps:.2f} GB/s ({phase.bytes_delivered / GB:.3f} GB)"),
                ("workers per replica", ", ".join(f"{r}: {n}" for r, n in sorted(phase.per_replica_workers.items()))),
                ("replica peak RSS", ", ".join(f"{m:.0f} MiB" for m in phase.replica_peak_rss_mib)),
            ]
        )
    hot_warm = phases[3]
    serving = len(hot_warm.per_replica_workers) or 1
    replica_rate = hot_warm.aggregate_gbps * GB / serving
    worker_rate = (hot_bytes / tp) / hot_warm.worker_p50_s
    sys.stdout.write(
        f"\nmeasured ceilings (hot, warm): one replica serves {replica_rate / GB:.2f} GB/s, "
        f"one worker receives {worker_rate / GB:.2f} GB/s (loopback, CPU-bound, shared cores)\n"
    )
    sys.stdout.write("projection (docs/scaling.md): a 140 GB model at TP 8, 100 Gb/s replica NICs, "
                     "200 Gb/s node NICs (25 Gb/s a worker), 2.5 GB/s origin per replica\n")  # fmt: skip
    projections = []
    for label, rates in (
        ("with the ceilings measured here", (replica_rate, worker_rate)),
        ("with ceilings above the NICs (many cores a replica)", (float("inf"), float("inf"))),
    ):
        sys.stdout.write(f"\n{label}:\n")
        rows = []
        for replicas, workers in ((8, 64), (8, 256), (16, 256), (32, 512), (64, 1024)):
            p = project(Fleet(replicas, workers), *rates)
            projections.append({"ceilings": label, "replicas": replicas, "workers": workers, **asdict(p)})
            rows.append(
                (
                    f"R={replicas:>2} W={workers:>4}",
                    f"origin {p.origin_bytes / GB:.0f} GB (uncoordinated {p.origin_bytes_uncoordinated / GB:.0f} GB), "
                    f"first ready {p.first_ready_s:.0f}s, all ready {p.all_ready_s:.0f}s, bound by {p.bottleneck}",
                )
            )
        print_table(rows)
    missed = [
        f"{phase.name}: origin bytes / model bytes {phase.origin_ratio:.2f}"
        for phase in phases
        if phase.origin_ratio > (1.05 if "cold" in phase.name else 0.01)
    ]
    for line in missed:
        sys.stdout.write(f"MISSED TARGET (one origin download per model, none when warm): {line}\n")
    if args.json:
        figures = {"phases": [asdict(p) for p in phases], "replica_rate": replica_rate, "worker_rate": worker_rate}
        args.json.write_text(json.dumps({**figures, "projections": projections}, indent=2))
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
