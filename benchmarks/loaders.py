"""Our safetensors loader against fastsafetensors, reading a ~256 MB file.

Each run opens the file with a loader and reads every tensor through read_range in
chunk-sized pieces, as the server's streams do: our loader preads each chunk from the
file; fastsafetensors bulk-reads the whole file into host memory on open, then chunks
are copied out of memory. Prints GB/s of each (best of the runs) and fastsafetensors
over ours, page cache warm and, where the kernel allows dropping a file's pages, cold.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import bench_root, drop_page_cache

from weightserve.config import ServerConfig
from weightserve.loaders import loader_for
from weightserve.loaders.pieces import read_range
from weightserve.sharding.tensor_plan import whole_tensor

TENSORS = 16
ROWS, COLS = 4096, 2048  # 16 MiB of bf16 each, 256 MiB in all


def ensure_file(directory: Path) -> Path:
    """Write the benchmark file once (atomically, so a killed run leaves none)."""
    import torch
    from safetensors.torch import save_file

    from weightserve.atomic import atomic_write

    path = directory / "model.safetensors"
    if not path.is_file():
        gen = torch.Generator().manual_seed(0)
        tensors = {
            f"layer.{i}.weight": torch.randn(ROWS, COLS, generator=gen).to(torch.bfloat16) for i in range(TENSORS)
        }
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    return path


def run(name: str, path: Path, chunk: int) -> tuple[float, int]:
    """Seconds to open `path` with loader `name` and read every tensor; bytes read."""
    buf = bytearray(chunk)
    started = time.perf_counter()
    total = 0
    with loader_for(name)([path]) as loader:
        for record in loader.records:
            plan = whole_tensor(record)
            for at in range(0, plan.nbytes, chunk):
                view = memoryview(buf)[: min(chunk, plan.nbytes - at)]
                read_range(plan, loader.sources, at, view)
                total += len(view)
    return time.perf_counter() - started, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    try:
        import fastsafetensors  # noqa: F401
    except ImportError:
        print("fastsafetensors is not installed: pip install 'weightserve[fastsafetensors]'")
        return 1
    path = ensure_file(bench_root() / "loaders")
    chunk = ServerConfig().chunk_bytes
    loaders = ("safetensors", "fastsafetensors")
    print(f"file: {path} ({path.stat().st_size / 1e6:.0f} MB), {TENSORS} tensors, reads of {chunk} bytes")
    for cache in ("warm", "cold"):
        best: dict[str, float] = {}
        for _ in range(args.runs):
            for name in loaders:  # alternate, so drift in the machine's load hits both
                if cache == "cold" and not drop_page_cache([path]):
                    print("cold: cannot drop the page cache here; skipped")
                    return 0
                if cache == "warm" and name not in best:
                    run(name, path, chunk)  # untimed: fills the page cache
                seconds, total = run(name, path, chunk)
                best[name] = min(best.get(name, float("inf")), seconds)
        rates = {name: total / best[name] / 1e9 for name in loaders}
        print(
            f"{cache}: safetensors (pread per chunk) {rates['safetensors']:.2f} GB/s, "
            f"fastsafetensors (bulk read, then memory) {rates['fastsafetensors']:.2f} GB/s, "
            f"fastsafetensors / safetensors = {rates['fastsafetensors'] / rates['safetensors']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
