"""Many clients, several models, a memory budget smaller than the models, and faults.

One `weightserve serve` subprocess with `--cache-memory BUDGET` serves 2-3 generated
Llama checkpoints whose sum exceeds the budget, so the cache evicts. CLIENTS asyncio
tasks (AsyncWeightClient, each on its own connection), spread over at most 4 worker
processes, fetch a seeded mix of (model, rank, world_size) shares through a loopback
proxy that drops each connection after a random 0.5-1.5 x CUT_EVERY MiB of server bytes
(always mid-stream: only FetchShard streams send reads that large). One client in four
stops reading once, mid-stream, for STALL seconds; half of those then give up
the fetch (abandoned by design), the others go on.

Every result is verified: each tensor's crc32c, computed over the bytes the client
returned, must equal the digest the stream sent for it and the manifest's; at
world_size 1 every tensor must also equal the safetensors file's bit for bit.

Prints completed, failed and abandoned fetches, p50/p99 time to first chunk (from the
fetch call to the first TensorChunk, measured here by wrapping the client's stream),
resumes (FetchStats.reconnects, bytes_after_reconnect), the proxy's cuts, the cache's
peak resident bytes, and the server's RSS growth over its idle RSS. Targets: 0 failed
fetches; RSS growth <= budget x 1.1 + 64 MiB; no stream left pinned once the clients
are gone; and the faults were injected. Exits non-zero when one is missed.
RESOURCE_EXHAUSTED is retried by the client library when the server sends a retry-after
hint (its RetryPolicy); one it does not retry, or that outlasts the retries, is a failed
fetch, reported with its status. With `--server-arg=--stream-idle-seconds=N` (N < STALL)
the server cuts a stall that outlasts the socket buffers (DEADLINE_EXCEEDED, then a resume).

`--short` is a configuration that runs in well under 30 s (tests/benchmarks runs it);
`--json PATH` writes the figures and the faults tried (tools/reliability_report.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    RssSampler,
    bench_root,
    ensure_checkpoint,
    free_port,
    llama_bytes,
    llama_shape_of_size,
    percentile,
    print_table,
    serve_command,
    wait_ready,
)

MiB = 1 << 20
HOST = "127.0.0.1"
MAX_PROCESSES = 4
WORLD_SIZES = (1, 2, 4, 8)
STALLER_EVERY = 4
"""Client i stalls in its first fetch when i % 4 == 1; it then gives up when i % 8 == 5."""
STALL_AFTER_MESSAGES = 2
MIN_CUT_READ = 64 * 1024
"""Only a read of at least this many server bytes is cut: a manifest never is, a data stream is."""
RSS_SLACK, RSS_EXTRA = 1.1, 64 * MiB
PINNED_WAIT_SECONDS = 15.0
SHORT = {"clients": 8, "processes": 2, "rounds": 2, "models_mb": "8,12,16", "budget": 32, "cut_every": 8, "stall": 1.0}
"""--short: three models of 8-17 MB (the largest under budget - reserved - one window) over a 32 MiB budget."""
SOURCE = "benchmarks/load.py"


# ----------------------------------------------------------------------- proxy


class Link:
    """One proxied connection: its two writers, and after how many server bytes it is dropped."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter, cut_at: float) -> None:
        self.writers = (client, upstream)
        self.cut_at = cut_at
        self.downstream_bytes = 0

    def abort(self) -> None:
        for writer in self.writers:
            writer.transport.abort()  # RST, as a dropped network path looks to both ends


class CuttingProxy:
    """Loopback TCP proxy that drops each connection after a random 0.5-1.5 x `cut_every` bytes
    from the server, at the first read of at least MIN_CUT_READ bytes past that point."""

    def __init__(self, upstream_port: int, cut_every: int, seed: int) -> None:
        self.upstream_port = upstream_port
        self.cut_every = cut_every
        self.rng = random.Random(seed)
        self.forwarded = self.cuts = self.connections = 0
        self._links: set[Link] = set()
        self._server: asyncio.AbstractServer | None = None
        self.address = ""

    async def start(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._accept, HOST, 0)
        self.address = f"{HOST}:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.abort()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(HOST, self.upstream_port)
        except OSError:
            client_writer.transport.abort()
            return
        cut_at = self.rng.uniform(0.5, 1.5) * self.cut_every if self.cut_every else math.inf
        link = Link(client_writer, upstream_writer, cut_at)
        for writer in link.writers:
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connections += 1
        self._links.add(link)
        try:
            await asyncio.gather(
                self._pump(client_reader, upstream_writer, link, None),
                self._pump(upstream_reader, client_writer, link, link),
            )
        finally:
            self._links.discard(link)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link, counted: Link | None
    ) -> None:
        try:
            while data := await reader.read(256 * 1024):
                if counted is not None:
                    counted.downstream_bytes += len(data)
                    self.forwarded += len(data)
                    if counted.downstream_bytes >= counted.cut_at and len(data) >= MIN_CUT_READ:
                        self.cuts += 1
                        return
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            link.abort()


# ---------------------------------------------------------------------- worker


@dataclass
class WorkerPlan:
    """What one worker process runs (sent as JSON on its command line)."""

    address: str
    direct: str
    models: dict[str, str]
    clients: list[int]
    rounds: int
    seconds: float
    stall: float
    seed: int


@dataclass
class FetchRecord:
    client: int
    round: int
    model: str
    rank: int
    world_size: int
    outcome: str = "failed"
    """completed, failed or abandoned (gave up after its stall, by design)."""
    error: str = ""
    first_chunk_s: float | None = None
    seconds: float = 0.0
    payload_bytes: int = 0
    reconnects: int = 0
    bytes_after_reconnect: int = 0
    integrity_retries: int = 0
    stalled: bool = False
    stream_errors: dict[str, int] = field(default_factory=dict)
    """Status codes of the streams that broke, by code (each one resumed unless the fetch failed)."""
    tensors_crc_checked: int = 0
    tensors_bit_equal: int = 0


class GaveUp(Exception):
    """A stalled client abandons its fetch."""


@dataclass
class Probe:
    """Watches one fetch's streams: the first chunk's time, each tensor's stream digest, the stall."""

    start: float
    stall: float
    give_up: bool
    first_chunk: float | None = None
    messages: int = 0
    stalled: bool = False
    digests: dict[int, int] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)

    async def seen(self, message: bytes) -> None:
        from weightserve import wire

        if self.first_chunk is None:
            self.first_chunk = time.perf_counter()
        self.messages += 1
        chunk = wire.decode_chunk(message)
        if chunk.packing is not None:  # several whole tensors, each with its crc32c
            from weightserve.v1 import weightserve_pb2 as pb

            packing = pb.Packing.FromString(bytes(chunk.packing))
            self.digests.update(zip(packing.tensor_index, packing.crc32c, strict=True))
        elif chunk.last:
            self.digests[chunk.tensor_index] = chunk.tensor_crc
        if self.stall and not self.stalled and self.messages == STALL_AFTER_MESSAGES:
            self.stalled = True
            await asyncio.sleep(self.stall)  # read nothing: flow control holds the server
            if self.give_up:
                raise GaveUp


class ProbedCall:
    """A FetchShard call whose messages pass through a Probe on their way to the client."""

    def __init__(self, call: Any, probe: Probe) -> None:
        self._call = call
        self._messages = call.__aiter__()
        self._probe = probe

    def __aiter__(self) -> ProbedCall:
        return self

    async def __anext__(self) -> bytes:
        try:
            message: bytes = await self._messages.__anext__()
        except grpc.RpcError as e:  # what the client will retry (or not): counted by code
            self._probe.errors[e.code().name] += 1
            raise
        await self._probe.seen(message)
        return message

    def cancel(self) -> bool:
        return bool(self._call.cancel())


def _verify(state: dict[str, Any], manifest: Any, probe: Probe, reference: Any, record: FetchRecord) -> None:
    """Every tensor's crc32c against the stream and the manifest; at world_size 1, bytes against the file."""
    import torch

    from weightserve import wire

    names = [t.name for t in manifest.tensors]
    if list(state) != names:
        raise AssertionError(f"tensors {sorted(set(state) ^ set(names))[:4]} differ from the manifest")
    for index, info in enumerate(manifest.tensors):
        tensor = state[info.name]
        if wire.dtype_name(tensor.dtype) != info.dtype or list(tensor.shape) != list(info.shape):
            raise AssertionError(f"{info.name}: {tensor.dtype} {list(tensor.shape)} is not the manifest's")
        raw = tensor.contiguous().reshape(-1).view(torch.uint8)
        crc = wire.crc32c(raw.numpy())
        if crc != probe.digests.get(index) or (info.HasField("crc32c") and crc != info.crc32c):
            raise AssertionError(f"{info.name}: crc32c {crc:#010x} is not the stream's or the manifest's")
        record.tensors_crc_checked += 1
        if reference is not None:
            expected = reference[info.name].contiguous().reshape(-1).view(torch.uint8)
            if not torch.equal(raw, expected):
                raise AssertionError(f"{info.name}: bytes differ from the safetensors file")
            record.tensors_bit_equal += 1


class Reference:
    """The safetensors files of one model, opened lazily (mmap) for bit-for-bit checks."""

    def __init__(self, model_dir: Path) -> None:
        from safetensors import safe_open

        self._files = [safe_open(str(p), framework="pt") for p in sorted(model_dir.glob("*.safetensors"))]
        self._where = {name: f for f in self._files for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)

    def __getitem__(self, name: str) -> Any:
        return self._where[name].get_tensor(name)


async def _one_fetch(client: Any, direct: Any, record: FetchRecord, probe: Probe, reference: Reference) -> None:
    from weightserve.errors import FetchError

    stock = client._fetch  # the client's FetchShard callable: wrap its calls, nothing else
    client._fetch = lambda request, **kw: ProbedCall(stock(request, **kw), probe)
    client.last_stats = None  # not the previous fetch's, should this one fail before its first stream
    try:
        state = await client.fetch_state_dict(record.model, record.rank, record.world_size)
        record.seconds = time.perf_counter() - probe.start
        manifest = await direct.get_manifest(record.model, record.rank, record.world_size)
        ref = reference if record.world_size == 1 else None
        await asyncio.to_thread(_verify, state, manifest, probe, ref, record)
        record.outcome = "completed"
    except GaveUp:
        record.outcome = "abandoned"
    except FetchError as e:
        record.error = f"{getattr(e.code(), 'name', e.code())}: {e}"
    except AssertionError as e:
        record.error = f"verification: {e}"
    except Exception as e:  # a client bug is a failed fetch too, reported with its type
        record.error = f"{type(e).__name__}: {e}"
    finally:
        client._fetch = stock
        stats = client.last_stats
        if stats is not None:
            record.payload_bytes = stats.payload_bytes
            record.reconnects = stats.reconnects
            record.bytes_after_reconnect = stats.bytes_after_reconnect
            record.integrity_retries = stats.integrity_retries
        if probe.first_chunk is not None:
            record.first_chunk_s = probe.first_chunk - probe.start
        record.stalled = probe.stalled
        record.stream_errors = dict(probe.errors)


async def _client(index: int, plan: WorkerPlan, direct: Any, refs: dict[str, Reference]) -> list[FetchRecord]:
    from weightserve.client import AsyncWeightClient

    rng = random.Random(plan.seed * 100_003 + index)
    staller = plan.stall > 0 and index % STALLER_EVERY == 1
    deadline = time.monotonic() + plan.seconds
    records = []
    async with AsyncWeightClient(plan.address) as client:
        round_ = 0
        while (round_ < plan.rounds) if not plan.seconds else (time.monotonic() < deadline):
            world_size = rng.choice(WORLD_SIZES)
            record = FetchRecord(index, round_, rng.choice(sorted(plan.models)), rng.randrange(world_size), world_size)
            stall = plan.stall if staller and round_ == 0 else 0.0
            probe = Probe(time.perf_counter(), stall, give_up=index % (2 * STALLER_EVERY) == STALLER_EVERY + 1)
            await _one_fetch(client, direct, record, probe, refs[record.model])
            records.append(record)
            round_ += 1
    return records


async def _worker(plan: WorkerPlan) -> list[FetchRecord]:
    from weightserve.client import AsyncWeightClient
    from weightserve.client import aio as client_aio

    # One connection per client, as separate worker processes have: without a local
    # subchannel pool, grpc shares one TCP connection among a process's channels.
    stock = client_aio.channel_options
    client_aio.channel_options = lambda: [*stock(), ("grpc.use_local_subchannel_pool", 1)]
    refs = {name: Reference(Path(path)) for name, path in plan.models.items()}
    async with AsyncWeightClient(plan.direct) as direct:
        results = await asyncio.gather(*(_client(i, plan, direct, refs) for i in plan.clients))
    return [record for records in results for record in records]


def worker_main(arg: str) -> None:
    plan = WorkerPlan(**json.loads(arg))
    records = asyncio.run(_worker(plan))
    sys.stdout.write(json.dumps([asdict(r) for r in records]) + "\n")


# ------------------------------------------------------------------------ run


@dataclass
class RunResult:
    records: list[FetchRecord]
    cuts: int
    connections: int
    forwarded: int
    wall_s: float
    resident_peak: int
    pinned_after: int
    worker_errors: list[str]


async def _cache_watch(direct: str, peak: list[int], stop: asyncio.Event) -> None:
    """Track the largest sum of resident bytes the server reports, until `stop`."""
    from weightserve.client import AsyncWeightClient

    async with AsyncWeightClient(direct, timeout=10) as client:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                peak[0] = max(peak[0], sum(m.cache.resident_bytes for m in await client.list_models()))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)


async def _pinned_streams(direct: str) -> int:
    """Streams the server still counts once every client is gone (it should release them all)."""
    from weightserve.client import AsyncWeightClient

    async with AsyncWeightClient(direct, timeout=10) as client:
        deadline = time.monotonic() + PINNED_WAIT_SECONDS
        while True:
            pinned = sum(m.cache.pinned_streams for m in await client.list_models())
            if pinned == 0 or time.monotonic() > deadline:
                return pinned
            await asyncio.sleep(0.2)


async def run(args: argparse.Namespace, direct: str, port: int, models: dict[str, str]) -> RunResult:
    proxy = await CuttingProxy(port, int(args.cut_every * MiB), args.seed).start()
    stop, peak = asyncio.Event(), [0]
    watch = asyncio.create_task(_cache_watch(direct, peak, stop))
    processes = min(args.processes, args.clients)
    started = time.perf_counter()
    procs = []
    for p in range(processes):
        plan = WorkerPlan(proxy.address, direct, models, list(range(p, args.clients, processes)),
                          args.rounds, args.seconds, args.stall, args.seed)  # fmt: skip
        argv = [str(Path(__file__).resolve()), "--worker", json.dumps(asdict(plan))]
        pipe = asyncio.subprocess.PIPE
        procs.append(await asyncio.create_subprocess_exec(sys.executable, *argv, stdout=pipe, stderr=pipe))
    outputs = await asyncio.gather(*(proc.communicate() for proc in procs))
    wall = time.perf_counter() - started
    stop.set()
    await watch
    await proxy.close()
    records, errors = [], []
    for proc, (out, err) in zip(procs, outputs, strict=True):
        lines = out.decode().strip().splitlines()
        if proc.returncode != 0 or not lines:
            errors.append(f"worker exit {proc.returncode}: {err.decode()[-2000:]}")
            continue
        records += [FetchRecord(**r) for r in json.loads(lines[-1])]
    pinned = await _pinned_streams(direct)
    return RunResult(records, proxy.cuts, proxy.connections, proxy.forwarded, wall, peak[0], pinned, errors)


# --------------------------------------------------------------------- report


def fault_rows(result: RunResult, args: argparse.Namespace, rss: tuple[int, float], where: str) -> list[dict[str, Any]]:
    """The faults this run met, as records for tools/reliability_report.py (same rows in every run)."""
    recs = result.records
    failed = [r for r in recs if r.outcome == "failed"]

    def row(fault: str, expect: str, cases: int, bad: int, detail: str) -> dict[str, Any]:
        return {"fault": fault, "expect": expect, "source": where, "cases": cases,
                "outcome": "failed" if bad else "passed", "detail": detail}  # fmt: skip

    def broke(r: FetchRecord, *codes: str) -> bool:
        return any(r.stream_errors.get(code) for code in codes)

    cut = [r for r in recs if broke(r, "UNAVAILABLE", "INTERNAL", "UNKNOWN")]
    refused = [r for r in recs if broke(r, "RESOURCE_EXHAUSTED")]
    continued = [r for r in recs if r.stalled and r.outcome != "abandoned"]
    abandoned = [r for r in recs if r.outcome == "abandoned"]
    growth, limit = rss
    return [
        row("connection dropped mid-stream (load)", "the client resumes from its last verified byte; bytes verified",
            result.cuts, sum(r.outcome == "failed" for r in cut), f"{len(cut)} fetches resumed after a cut"),
        row("memory budget or stream limit full (load)",
            "RESOURCE_EXHAUSTED with retry-after-ms; the client waits and resumes",
            sum(r.stream_errors.get("RESOURCE_EXHAUSTED", 0) for r in recs),
            sum(r.outcome == "failed" for r in refused), f"{len(refused)} fetches refused at least once"),
        row("client stops reading mid-stream, then goes on (load)", "the stream waits; the fetch completes verified",
            len(continued), sum(r.outcome == "failed" for r in continued), f"stalls of {args.stall:g} s"),
        row("client abandons a stalled fetch (load)", "the server releases the stream",
            len(abandoned), result.pinned_after, f"{result.pinned_after} streams left pinned"),
        row(f"{args.clients} concurrent clients, models over the memory budget (load)",
            "every fetch completes verified; server RSS growth <= budget x 1.1 + 64 MiB",
            len(recs), len(failed) + (growth > limit) + len(result.worker_errors),
            f"{len(failed)} failed; RSS growth {growth / MiB:.0f} of {limit / MiB:.0f} MiB"),
    ]  # fmt: skip


def report(args: argparse.Namespace, result: RunResult, sizes: dict[str, int], rss: RssSampler) -> int:
    recs = result.records
    by = Counter(r.outcome for r in recs)
    ttfc = [r.first_chunk_s for r in recs if r.first_chunk_s is not None]
    budget = int(args.budget * MiB)
    rss_limit = budget * RSS_SLACK + RSS_EXTRA
    expected_abandoned = sum(1 for i in range(args.clients) if i % (2 * STALLER_EVERY) == STALLER_EVERY + 1)
    expected_abandoned *= bool(args.stall)
    payload = sum(r.payload_bytes for r in recs)
    codes: Counter[str] = Counter()
    for r in recs:
        codes.update(r.stream_errors)
    checks = [
        ("failed fetches", by["failed"] == 0 and not result.worker_errors),
        ("server RSS growth", rss.growth <= rss_limit),
        ("streams left pinned", result.pinned_after == 0),
        ("connections cut", result.cuts > 0 or not args.cut_every),
        ("stalls", any(r.stalled for r in recs) or not args.stall),
    ]
    rows = [
        ("models", ", ".join(f"{n} {s / 1e6:.0f} MB" for n, s in sizes.items())),
        ("memory budget", f"{args.budget:g} MiB (models sum {sum(sizes.values()) / MiB:.0f} MiB)"),
        ("clients", f"{args.clients} over {min(args.processes, args.clients)} processes"),
        ("started fetches", str(len(recs))),
        ("completed fetches", str(by["completed"])),
        ("failed fetches", f"{by['failed']}  (target 0)"),
        ("abandoned fetches", f"{by['abandoned']}  (by design: {expected_abandoned} stalled clients give up)"),
        ("verified tensors", f"{sum(r.tensors_crc_checked for r in recs)} crc32c, "
                             f"{sum(r.tensors_bit_equal for r in recs)} bit-equal to the file (world_size 1)"),
        ("time to first chunk", f"p50 {percentile(ttfc, 50) * 1e3:.0f} ms, p99 {percentile(ttfc, 99) * 1e3:.0f} ms"),
        ("connections cut", f"{result.cuts} of {result.connections} (each after 0.5-1.5 x {args.cut_every:g} MiB)"),
        ("resumes", f"{sum(r.reconnects for r in recs)} in {sum(bool(r.reconnects) for r in recs)} fetches, "
                    f"{sum(r.bytes_after_reconnect for r in recs) / MiB:.0f} MiB after reconnect"),
        ("broken streams", ", ".join(f"{code} {n}" for code, n in codes.most_common()) or "none"),
        ("integrity retries", str(sum(r.integrity_retries for r in recs))),
        ("stalled fetches", f"{sum(r.stalled for r in recs)} ({args.stall:g} s each)"),
        ("payload", f"{payload / 1e9:.2f} GB in {result.wall_s:.1f} s ({payload / result.wall_s / 1e9:.2f} GB/s)"),
        ("cache resident peak", f"{result.resident_peak / MiB:.0f} MiB"),
        ("streams left pinned", f"{result.pinned_after}  (target 0)"),
        ("server RSS idle", f"{rss.before / MiB:.0f} MiB"),
        ("server RSS growth", f"{rss.growth / MiB:.0f} MiB  (target <= {rss_limit / MiB:.0f} MiB)"),
    ]  # fmt: skip
    print_table(rows)
    for r in [r for r in recs if r.outcome == "failed"][:10]:
        sys.stdout.write(f"FAILED client {r.client} {r.model} rank {r.rank}/{r.world_size}: {r.error[:300]}\n")
    for error in result.worker_errors:
        sys.stdout.write(f"WORKER {error}\n")
    missed = [name for name, ok in checks if not ok]
    if args.json:
        where = f"{SOURCE} --short" if args.short else SOURCE
        summary = {
            "figures": dict(rows),
            "counts": {"started": len(recs), **{k: by[k] for k in ("completed", "failed", "abandoned")}},
            "missed": missed,
            "faults": fault_rows(result, args, (rss.growth, rss_limit), where),
        }
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    if missed:
        sys.stdout.write(f"MISSED: {', '.join(missed)}\n")
        return 1
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--processes", type=int, default=4, choices=range(1, MAX_PROCESSES + 1))
    parser.add_argument("--rounds", type=int, default=2, help="fetches per client (default 2)")
    parser.add_argument("--seconds", type=float, default=0.0, help="fetch until then instead of --rounds")
    parser.add_argument("--models-mb", default="192,224,256", help="approximate model sizes, MB (2-3 models)")
    parser.add_argument("--budget", type=float, default=512, help="--cache-memory of the server, MiB")
    parser.add_argument("--cut-every", type=float, default=256, help="MiB forwarded per dropped connection; 0: none")
    parser.add_argument("--stall", type=float, default=3.0, help="seconds a stalling client reads nothing; 0: none")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-arg", action="append", default=[], help="extra `weightserve serve` flag")
    parser.add_argument("--short", action="store_true", help="a small run (< 30 s): 8 clients, 3 models of ~12 MB")
    parser.add_argument("--json", help="write the figures and the faults tried here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    if parser.parse_known_args()[0].short:  # the short run's values, as defaults that flags still override
        parser.set_defaults(**SHORT)
    args = parser.parse_args()
    if args.short:  # small chunks: many messages to cut, and a budget valid at any core count
        args.server_arg = ["--read-threads", "2", "--chunk-bytes", "262144", *args.server_arg]
    return args


def main() -> int:
    args = parse_args()
    if args.worker:
        worker_main(args.worker)
        return 0
    root = bench_root()
    shapes = [llama_shape_of_size(int(float(mb) * 1e6)) for mb in args.models_mb.split(",")]
    models = {}
    for shape in shapes:
        name = f"bench/load-h{shape.hidden_size}-l{shape.num_hidden_layers}"
        models[name] = str(ensure_checkpoint(root, name, shape))
    sizes = {name: llama_bytes(shape) for name, shape in zip(models, shapes, strict=True)}
    port = free_port()
    direct = f"{HOST}:{port}"
    cmd = serve_command(root, direct, "--cache-memory", str(int(args.budget * MiB)), *args.server_arg)
    with tempfile.TemporaryFile() as log, served(cmd, direct, log) as server:
        time.sleep(0.5)  # let the idle RSS settle
        with RssSampler(server.pid) as rss:
            result = asyncio.run(run(args, direct, port, models))
        code = report(args, result, sizes, rss)
        if code:
            log.seek(0)
            sys.stdout.write("server log (tail):\n" + log.read().decode(errors="replace")[-4000:])
    return code


@contextlib.contextmanager
def served(cmd: list[str], address: str, log: IO[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """The server subprocess, its output in `log` (a pipe nobody reads would fill and block it)."""
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(address)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
