"""Refit: a trainer publishes three versions; eight tensor-parallel ranks update in place.

On the ~1 GiB bf16 bench checkpoint, served by one `weightserve serve --state-dir`
subprocess, a trainer (this process) publishes versions 1, 2 and 3, each changing
10 %, 50 % and 100 % of the tensors (every element of a chosen tensor changes). Eight
worker processes hold their TP-8 share of the previous version and call
`client.update(..., since_version=previous)`, released together; then the same eight
fetch the new version whole, released together. For each version it prints:
  - bytes the ranks received over the bytes of their changed slices (target <= 1.02);
  - the time until all eight ranks were updated, over the time of the full fetch (the
    version is opened first, its blobs checked, so neither pays that; printed apart);
  - the trainer's publish time over writing the same bytes to a file and fsyncing it
    (publishing is disk-bound), and the server's RSS (peak, and growth over the update);
  - whether every rank ended bit-identical to its full fetch (it must).
Exits non-zero when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _common import (
    RssSampler,
    bench_root,
    ensure_checkpoint,
    free_port,
    print_table,
    serve_command,
    subprocess_server,
)

MODEL = "bench/llama-1g"
WORLD = 8
FRACTIONS = (0.1, 0.5, 1.0)
TARGET_SENT = 1.02
WAIT_SECONDS = 600.0


def chosen(names: list[str], fraction: float) -> list[str]:
    """round(fraction x len) tensors spread evenly over the sorted names."""
    return [n for i, n in enumerate(names) if math.floor((i + 1) * fraction) > math.floor(i * fraction)]


def wait_files(folder: Path, pattern: str, count: int, procs: list[subprocess.Popen[bytes]]) -> list[Path]:
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        found = sorted(folder.glob(pattern))
        if len(found) >= count:
            return found
        dead = [p.args for p in procs if p.poll() not in (None, 0)]
        if dead:
            raise SystemExit(f"a worker failed: {dead[0]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{pattern}: {len(found)} of {count} after {WAIT_SECONDS} s")
        time.sleep(0.005)


def wait_go(barrier: Path, name: str) -> None:
    while not (barrier / name).exists():
        time.sleep(0.002)


def write_json(path: Path, value: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.rename(path)


# --------------------------------------------------------------------- worker


def worker(address: str, rank: int, world: int, barrier: Path, steps: int) -> None:
    """Hold this rank's share; per step: update in place when told, then fetch whole when told."""
    from weightserve.client import WeightClient

    with WeightClient(address) as client:
        held = client.fetch_state_dict(MODEL, rank, world, version=0)
        (barrier / f"ready-{rank}").touch()
        version = 0
        for step in range(1, steps + 1):
            wait_go(barrier, f"go-update-{step}")
            names = json.loads((barrier / f"changed-{step}.json").read_text())
            start = time.time()
            new = client.update(held, MODEL, rank, world, since_version=version)
            end = time.time()
            stats = client.last_fetch_stats
            assert stats is not None
            expected = sum(held[n].nbytes for n in names if n in held)
            result = {"start": start, "end": end, "received": stats.bytes_received, "payload": stats.payload_bytes,
                      "expected": expected, "version": new}  # fmt: skip
            write_json(barrier / f"update-{step}-{rank}.json", result)
            wait_go(barrier, f"go-full-{step}")
            start = time.time()
            full = client.fetch_state_dict(MODEL, rank, world, version=new)
            end = time.time()
            identical = sorted(full) == sorted(held) and all(full[n].equal(held[n]) for n in full)
            write_json(barrier / f"full-{step}-{rank}.json", {"start": start, "end": end, "identical": identical})
            del full
            version = new


# ----------------------------------------------------------------------- main


def span(found: list[dict[str, float]]) -> float:
    return max(r["end"] for r in found) - min(r["start"] for r in found)


def results(barrier: Path, pattern: str, procs: list[subprocess.Popen[bytes]]) -> list[dict[str, float]]:
    return [json.loads(p.read_text()) for p in wait_files(barrier, pattern, WORLD, procs)]


def raw_write_seconds(folder: Path, tensors: list[torch.Tensor]) -> float:
    """The baseline for publishing: the same bytes written to a file in the state dir and fsynced."""
    path = folder / "raw-write-baseline"
    started = time.perf_counter()
    with path.open("wb") as f:
        for tensor in tensors:
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - started
    path.unlink()
    return seconds


def step_rows(
    label: str,
    publish: tuple[int, float, float, float],
    sent: tuple[int, int],
    seconds: tuple[float, float],
    rss: tuple[int, int, int],
    identical: bool,
) -> list[tuple[str, str]]:
    """The table rows of one version."""
    published, publish_s, raw_s, open_s = publish
    received, expected = sent
    update_s, full_s = seconds
    peak, growth, model_bytes = rss
    return [
        (label, f"{published / 1e9:.3f} GB published in {publish_s:.1f} s ({published / publish_s / 1e9:.2f} GB/s)"),
        ("  publish / raw write + fsync", f"{publish_s / raw_s:.2f}  (raw {published / raw_s / 1e9:.2f} GB/s)"),
        ("  first use of the version", f"{open_s:.2f} s (its blobs' crc32c checked once, before the ranks start)"),
        ("  received / changed slices", f"{received / expected:.4f}  ({received / 1e6:.1f} MB for "
                                        f"{expected / 1e6:.1f} MB)  (target <= {TARGET_SENT})"),
        ("  all ranks updated / full fetch", f"{update_s / full_s:.3f}  ({update_s:.2f} s vs {full_s:.2f} s)"),
        ("  server RSS peak / growth", f"{peak / 1e9:.2f} GB / {growth / 1e6:.0f} MB "
                                       f"({growth / model_bytes:.2f} x model)"),
        ("  every rank equals its full fetch", "yes" if identical else "NO"),
    ]  # fmt: skip


def measure() -> list[tuple[str, str]]:
    from weightserve.client import WeightClient

    root = bench_root()
    model_dir = ensure_checkpoint(root)
    for path in sorted(model_dir.glob("*.safetensors")):  # warm the page cache
        path.read_bytes()
    address = f"127.0.0.1:{free_port()}"
    rows: list[tuple[str, str]] = [("checkpoint", MODEL), ("ranks", f"TP {WORLD}, one process each")]
    missed: list[str] = []
    with (
        tempfile.TemporaryDirectory(prefix="refit-state-") as state,
        tempfile.TemporaryDirectory(prefix="refit-") as folder,
        subprocess_server(serve_command(root, address, "--state-dir", state), address) as server,
        WeightClient(address) as trainer,
    ):
        barrier = Path(folder)
        weights = trainer.fetch_state_dict(MODEL)
        model_bytes = sum(t.nbytes for t in weights.values())
        names = sorted(weights)
        script = str(Path(__file__).resolve())
        procs = [
            subprocess.Popen([sys.executable, script, "--worker", address, str(r), str(WORLD), folder, "3"])
            for r in range(WORLD)
        ]
        try:
            wait_files(barrier, "ready-*", WORLD, procs)
            for step, fraction in enumerate(FRACTIONS, start=1):
                changes = chosen(names, fraction)
                for name in changes:
                    weights[name] = weights[name] + 1
                started = time.perf_counter()
                version = trainer.publish(MODEL, {n: weights[n] for n in changes})
                publish_s = time.perf_counter() - started
                published = sum(weights[n].nbytes for n in changes)
                started = time.perf_counter()  # the first use opens the version (its blobs' crc32c checked)
                trainer.get_manifest(MODEL, version=version)
                open_s = time.perf_counter() - started
                write_json(barrier / f"changed-{step}.json", changes)
                with RssSampler(server.pid) as rss:
                    (barrier / f"go-update-{step}").touch()
                    updates = [
                        json.loads(p.read_text()) for p in wait_files(barrier, f"update-{step}-*.json", WORLD, procs)
                    ]
                (barrier / f"go-full-{step}").touch()
                fulls = [json.loads(p.read_text()) for p in wait_files(barrier, f"full-{step}-*.json", WORLD, procs)]
                raw_s = raw_write_seconds(Path(state), [weights[n] for n in changes])
                received = sum(r["received"] for r in updates)
                expected = sum(r["expected"] for r in updates)
                sent_ratio = received / expected
                identical = all(r["identical"] for r in fulls) and all(r["version"] == version for r in updates)
                rows += step_rows(
                    f"v{version}: {len(changes)}/{len(names)} tensors ({fraction:.0%})",
                    (published, publish_s, raw_s, open_s), (received, expected), (span(updates), span(fulls)),
                    (rss.peak, rss.growth, model_bytes), identical,
                )  # fmt: skip
                if sent_ratio > TARGET_SENT:
                    missed.append(f"bytes sent v{version}")
                if not identical:
                    missed.append(f"bit-identical v{version}")
            for proc in procs:
                proc.wait(60)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
    print_table(rows)
    return missed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=5, metavar=("ADDRESS", "RANK", "WORLD", "BARRIER", "STEPS"))
    args = parser.parse_args()
    if args.worker:
        address, rank, world, barrier, steps = args.worker
        worker(address, int(rank), int(world), Path(barrier), int(steps))
        return 0
    missed = measure()
    if missed:
        sys.stdout.write(f"MISSED: {', '.join(missed)}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
