"""Eight tensor-parallel ranks fetching at once from one server, against one whole-model stream.

From one `weightserve serve` subprocess and the ~1 GiB bf16 bench checkpoint
(16 heads, 4 k/v heads: at TP 8 each k/v head goes to 2 ranks), prints:
  - total bytes sent to the 8 ranks over the model's bytes, against the allowed
    figure (model + replicated x (W-1) + k/v replicas + vocab padding) / model x 1.02;
  - the 8 ranks' aggregate GB/s (8 client processes released together) over one
    client fetching the whole model at W = 1, both from this run (target >= 0.8);
  - the server's RSS growth while the 8 ranks fetch (peak minus before) over the
    model's size (target <= 1.1).
Exits non-zero when a target is missed. Each figure is the best of --repeat runs
(RSS: the worst).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil
from _common import (
    BENCH_SHAPE,
    RssSampler,
    bench_root,
    ensure_checkpoint,
    free_port,
    print_table,
    run_worker,
    serve_command,
    subprocess_server,
)

MODEL = "bench/llama-1g"
WORLD = 8
VOCAB_PADDING = 64
BF16 = 2
TARGET_SLACK, TARGET_AGGREGATE, TARGET_SERVER_RSS = 1.02, 0.8, 1.1


def expected_bytes(world: int) -> dict[str, int]:
    """What W ranks receive together, by cause, from BENCH_SHAPE's formulas (bf16).

    Raises:
        SystemExit: the shape cannot be split `world` ways.
    """
    s = BENCH_SHAPE
    h, i, v, layers = s.hidden_size, s.intermediate_size, s.vocab_size, s.num_hidden_layers
    heads, kv = s.num_attention_heads, s.num_key_value_heads
    head_dim = h // heads
    padded = -(-v // VOCAB_PADDING) * VOCAB_PADDING
    vocab_tensors = 1 if s.tie_word_embeddings else 2
    problems = [
        f"{what} {n} is not divisible by {world}"
        for what, n in (("heads", heads), ("intermediate", i), ("padded vocab", padded))
        if n % world
    ]
    if (kv % world if world <= kv else world % kv) != 0:
        problems.append(f"k/v heads {kv} and world size {world}: neither divides the other")
    if problems:
        raise SystemExit(f"BENCH_SHAPE cannot be split {world} ways: {'; '.join(problems)}")
    norms = (2 * layers + 1) * h
    per_layer = 2 * h * h + 2 * kv * head_dim * h + 3 * i * h
    return {
        "model": BF16 * (vocab_tensors * v * h + layers * per_layer + norms),
        "replicated": BF16 * norms * (world - 1),
        "kv_replicas": BF16 * layers * 2 * max(world - kv, 0) * head_dim * h,
        "padding": BF16 * vocab_tensors * (padded - v) * h,
    }


# --------------------------------------------------------------------- worker


def _fetch_worker(address: str, rank: int, world: int, barrier: str) -> dict[str, float]:
    """Connect and plan, say ready, wait for the go file, fetch; times are wall-clock."""
    from weightserve.client import WeightClient

    barrier_dir = Path(barrier)
    with WeightClient(address) as client:
        client.get_manifest(MODEL, rank=rank, world_size=world)  # connect and plan before the clock
        (barrier_dir / f"ready-{rank}").touch()
        while not (barrier_dir / "go").exists():
            time.sleep(0.002)
        start = time.time()
        state = client.fetch_state_dict(MODEL, rank=rank, world_size=world)
        end = time.time()
        stats = client.last_stats
        assert stats is not None
        tensor_bytes = sum(t.numel() * t.element_size() for t in state.values())
    return {
        "start": start,
        "end": end,
        "payload": stats.payload_bytes,
        "received": stats.bytes_received,
        "tensor_bytes": tensor_bytes,
    }


def _worker(argv: list[str]) -> None:
    result = _fetch_worker(argv[0], int(argv[1]), int(argv[2]), argv[3])
    sys.stdout.write(json.dumps(result) + "\n")


# ----------------------------------------------------------------------- main


def _server_cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _run_ranks(
    script: Path, address: str, world: int, server_pid: int, sample_rss: bool
) -> tuple[list[dict[str, float]], int, float]:
    """All ranks of one world size at once.

    Returns:
        Their results, the server's RSS growth while they fetched (0 unless
        `sample_rss`), and the server's CPU seconds while they fetched.
    """
    with tempfile.TemporaryDirectory(prefix="tp-fetch-") as barrier, ThreadPoolExecutor(world) as pool:
        futures = [pool.submit(run_worker, script, address, str(rank), str(world), barrier) for rank in range(world)]
        deadline = time.monotonic() + 600
        while sum(1 for _ in Path(barrier).glob("ready-*")) < world:
            if any(f.done() for f in futures):  # a worker died before it was ready
                for f in futures:
                    if f.done():
                        f.result()
            if time.monotonic() > deadline:
                raise TimeoutError("workers did not get ready in 600 s")
            time.sleep(0.01)
        cpu = _server_cpu(server_pid)
        if not sample_rss:
            (Path(barrier) / "go").touch()
            results = [f.result() for f in futures]
            return results, 0, _server_cpu(server_pid) - cpu
        with RssSampler(server_pid) as sampler:
            (Path(barrier) / "go").touch()
            results = [f.result() for f in futures]
        return results, sampler.growth, _server_cpu(server_pid) - cpu


def gbps(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9


def _warm(model_dir: Path) -> None:
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb") as f:
            while f.read(64 << 20):
                pass


@dataclass
class Runs:
    """What --repeat rounds of (one W=1 stream, then W ranks at once) measured."""

    singles: list[dict[str, float]] = field(default_factory=list)
    parallels: list[list[dict[str, float]]] = field(default_factory=list)
    growths: list[int] = field(default_factory=list)
    single_cpu: list[float] = field(default_factory=list)
    parallel_cpu: list[float] = field(default_factory=list)


def _measure(repeat: int) -> Runs:
    root = bench_root()
    model_dir = ensure_checkpoint(root)
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    model = expected_bytes(WORLD)["model"]
    if index["metadata"]["total_size"] != model:
        raise SystemExit(f"{model_dir}: {index['metadata']['total_size']} tensor bytes; BENCH_SHAPE implies {model}")
    script = Path(__file__).resolve()
    address = f"127.0.0.1:{free_port()}"
    serve_cmd = serve_command(root, address)
    runs = Runs()
    with subprocess_server(serve_cmd, address) as server:
        _warm(model_dir)
        for _ in range(repeat):
            results, _, cpu = _run_ranks(script, address, 1, server.pid, sample_rss=False)
            runs.singles += results
            runs.single_cpu.append(cpu)
            results, growth, cpu = _run_ranks(script, address, WORLD, server.pid, sample_rss=True)
            runs.parallels.append(results)
            runs.growths.append(growth)
            runs.parallel_cpu.append(cpu)
    return runs


def _aggregate(results: list[dict[str, float]]) -> float:
    seconds = max(r["end"] for r in results) - min(r["start"] for r in results)
    return gbps(sum(r["payload"] for r in results), seconds)


def _report(runs: Runs) -> list[str]:
    """Print the table; returns the targets missed."""
    expected = expected_bytes(WORLD)
    model = expected["model"]
    single = max(runs.singles, key=lambda r: gbps(r["payload"], r["end"] - r["start"]))
    single_gbps = gbps(single["payload"], single["end"] - single["start"])
    best = max(runs.parallels, key=_aggregate)
    agg_gbps = _aggregate(best)
    sent = sum(r["received"] for r in best)
    payload = sum(r["payload"] for r in best)
    expected_payload = sum(expected.values())
    allowed = expected_payload / model * TARGET_SLACK
    scaling = agg_gbps / single_gbps
    rss_ratio = max(runs.growths) / model
    cpu_single = min(runs.single_cpu) / model * 1e9
    cpu_parallel = min(runs.parallel_cpu) / payload * 1e9
    rows = [
        ("checkpoint", f"{model / 1e9:.3f} GB bf16 tensors, {MODEL}"),
        ("world size", f"{WORLD} ranks, one client process each, released together"),
        ("replicated x (W-1)", f"{expected['replicated'] / 1e6:.3f} MB"),
        ("k/v replicas", f"{expected['kv_replicas'] / 1e6:.3f} MB"),
        ("vocab padding", f"{expected['padding'] / 1e6:.3f} MB"),
        ("payload to all ranks / model", f"{payload / model:.4f}  (expected {expected_payload / model:.4f})"),
        ("bytes sent (wire) / model", f"{sent / model:.4f}  (target <= {allowed:.4f})"),
        ("single stream, W=1", f"{single_gbps:.2f} GB/s"),
        (f"aggregate, W={WORLD}", f"{agg_gbps:.2f} GB/s"),
        ("aggregate / single stream", f"{scaling:.3f}  (target >= {TARGET_AGGREGATE})"),
        (f"server CPU s per GB, W=1 / W={WORLD}", f"{cpu_single:.2f} / {cpu_parallel:.2f}"),
        (
            "server RSS growth / model",
            f"{rss_ratio:.3f}  ({max(runs.growths) / 1e6:.1f} MB)  (target <= {TARGET_SERVER_RSS})",
        ),
    ]
    print_table(rows)
    checks = (
        ("W=1 payload", single["payload"] == model),
        ("payload bytes", payload == expected_payload),
        ("bytes sent", sent / model <= allowed),
        ("aggregate throughput", scaling >= TARGET_AGGREGATE),
        ("server RSS", rss_ratio <= TARGET_SERVER_RSS),
    )
    return [name for name, ok in checks if not ok]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--worker", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker)
        return 0
    missed = _report(_measure(args.repeat))
    if missed:
        sys.stdout.write(f"MISSED: {', '.join(missed)}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
