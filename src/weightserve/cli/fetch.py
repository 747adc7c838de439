"""`weightserve fetch` and `weightserve ls`: a rank's state dict and the server's models, from a shell."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fetch = sub.add_parser("fetch", help="fetch a rank's state dict and the model's files")
    fetch.add_argument("model")
    fetch.add_argument("--server", required=True, help="HOST:PORT or unix:PATH")
    fetch.add_argument("--out", required=True, help="directory to write into")
    fetch.add_argument("--rank", type=int, default=0)
    fetch.add_argument("--world-size", type=int, default=1)
    fetch.add_argument("--revision")
    fetch.add_argument("--format")
    fetch.set_defaults(run=run_fetch)

    ls = sub.add_parser("ls", help="list the server's models")
    ls.add_argument("--server", required=True)
    ls.set_defaults(run=run_ls)


def run_fetch(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from weightserve.atomic import atomic_write
    from weightserve.client import WeightClient

    out = Path(args.out)
    with WeightClient(args.server) as client:
        state = client.fetch_state_dict(
            args.model, args.rank, args.world_size, revision=args.revision, format=args.format
        )
        name = "model.safetensors" if args.world_size == 1 else f"model-rank-{args.rank}-part-0.safetensors"
        atomic_write(out / name, lambda tmp: save_file({k: v.contiguous() for k, v in state.items()}, str(tmp)))
        files = client.fetch_files(args.model, out, revision=args.revision)
    total = sum(t.numel() * t.element_size() for t in state.values())
    sys.stdout.write(f"wrote {len(state)} tensors ({total:,} bytes) to {out / name} and {len(files)} files\n")
    return 0


def run_ls(args: argparse.Namespace) -> int:
    from weightserve.client import WeightClient
    from weightserve.v1 import weightserve_pb2 as pb

    with WeightClient(args.server) as client:
        models = client.list_models()
    rows = [("MODEL", "FORMAT", "BYTES", "REVISION", "CACHE", "RESIDENT", "STREAMS", "LAST USED", "LOAD")]
    for m in models:
        cache = m.cache
        state = pb.CacheState.Name(cache.state).removeprefix("CACHE_STATE_").lower()
        last = time.strftime("%H:%M:%S", time.localtime(cache.last_used_unix)) if cache.last_used_unix else "-"
        load = (
            f"{cache.load_source} {cache.load_bytes / max(cache.load_seconds, 1e-9) / 1e9:.2f} GB/s"
            if cache.load_seconds
            else "-"
        )
        rows.append(
            (
                m.name,
                m.format,
                f"{m.total_bytes:,}",
                m.revision,
                state,
                f"{cache.resident_bytes:,}",
                str(cache.pinned_streams),
                last,
                load,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        sys.stdout.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n")
    return 0
