"""Cold versus warm fetches, and serving a model twice the memory budget.

Prints, from one run:
  - a cold fetch (the server opens the model and reads it from disk, page cache dropped
    where the OS allows) and a warm fetch (every chunk already in the cache), GB/s each,
    and warm over cold;
  - the server's RSS growth while serving a model twice its --cache-memory budget,
    over that budget (target <= 1.10).
Exits non-zero when a target is missed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    RssSampler,
    bench_root,
    drop_page_cache,
    ensure_checkpoint,
    free_port,
    print_table,
    serve_command,
    subprocess_server,
)

from weightserve.client import WeightClient
from weightserve.testing import LlamaShape

MODEL = "bench/llama-cache"
SHAPE = LlamaShape(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=32000,
)  # about 311 MB of bf16
TARGET_RSS = 1.10


def timed_fetch(address: str) -> tuple[float, int]:
    with WeightClient(address) as client:
        client.list_models()
        start = time.perf_counter()
        state = client.fetch_state_dict(MODEL)
        seconds = time.perf_counter() - start
    return seconds, sum(t.numel() * t.element_size() for t in state.values())


def main() -> int:
    root = bench_root()
    model_dir = ensure_checkpoint(root, MODEL, SHAPE)
    model_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))

    address = f"127.0.0.1:{free_port()}"
    with subprocess_server(serve_command(root, address, "--cache-memory", str(4 * model_bytes)), address):
        dropped = drop_page_cache(model_dir.glob("*.safetensors"))
        cold_s, nbytes = timed_fetch(address)
        warm_s, _ = timed_fetch(address)
    cold, warm = nbytes / cold_s / 1e9, nbytes / warm_s / 1e9

    budget = model_bytes // 2
    address = f"127.0.0.1:{free_port()}"
    with subprocess_server(serve_command(root, address, "--cache-memory", str(budget)), address) as server:
        with WeightClient(address) as client:
            client.list_models()  # the server is up and its imports are done
        with RssSampler(server.pid) as sampler:
            for _ in range(2):
                timed_fetch(address)
    rss_ratio = sampler.growth / budget

    rows = [
        ("model", f"{model_bytes / 1e9:.2f} GB bf16 ({MODEL})"),
        ("cold fetch", f"{cold:.2f} GB/s (page cache {'dropped' if dropped else 'kept'})"),
        ("warm fetch (from cache)", f"{warm:.2f} GB/s"),
        ("warm / cold", f"{warm / cold:.2f}"),
        (
            "RSS growth, model = 2x budget",
            f"{sampler.growth / 2**20:.0f} MiB for {budget / 2**20:.0f} MiB budget",
        ),
        ("RSS growth / budget", f"{rss_ratio:.3f}  (target <= {TARGET_RSS})"),
    ]
    print_table(rows)
    if rss_ratio > TARGET_RSS:
        sys.stdout.write("MISSED: RSS growth over budget\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
