"""`weightserve fetch`, `ls` and `prefetch`: a rank's state dict, the server's models, a warm cache."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from weightserve.cli.output import check_out_dir, write_failure
from weightserve.cli.remote import add_server_args, connect, non_negative_int, positive_int

if TYPE_CHECKING:
    from weightserve.client import WeightClient
    from weightserve.v1 import weightserve_pb2 as pb

POLL_SECONDS = 0.5
"""How often `prefetch --wait` on a terminal looks at the model's resident bytes."""


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fetch = sub.add_parser("fetch", help="fetch a rank's state dict and the model's files")
    fetch.add_argument("model")
    add_server_args(fetch)
    fetch.add_argument("--out", required=True, help="directory to write into (made if missing)")
    fetch.add_argument("--rank", type=non_negative_int, default=0, help="tensor-parallel rank (default 0)")
    fetch.add_argument("--world-size", type=positive_int, default=1, help="tensor-parallel size (default 1)")
    fetch.add_argument("--revision")
    fetch.add_argument("--format")
    fetch.set_defaults(run=run_fetch)

    ls = sub.add_parser("ls", help="list the server's models")
    add_server_args(ls)
    ls.set_defaults(run=run_ls)

    prefetch = sub.add_parser("prefetch", help="warm a model's ranks in the server's cache")
    prefetch.add_argument("model")
    add_server_args(prefetch, timeout=600.0, timeout_help="seconds the call may take, the warming with --wait (600)")
    prefetch.add_argument(
        "--world-size", type=positive_int, default=1, help="tensor-parallel size of the ranks (default 1)"
    )
    prefetch.add_argument(
        "--ranks", type=non_negative_int, nargs="+", metavar="RANK", help="ranks to warm (default: all)"
    )
    prefetch.add_argument("--wait", action="store_true", help="answer when the warming is done (default: at once)")
    prefetch.set_defaults(run=run_prefetch)


def run_fetch(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from weightserve.atomic import atomic_write

    out = check_out_dir(Path(args.out))  # before the fetch, which a bad --out would waste
    with connect(args) as client:
        state = client.fetch_state_dict(
            args.model, args.rank, args.world_size, revision=args.revision, format=args.format
        )
        name = "model.safetensors" if args.world_size == 1 else f"model-rank-{args.rank}-part-0.safetensors"
        total = sum(t.numel() * t.element_size() for t in state.values())
        try:
            atomic_write(out / name, lambda tmp: save_file({k: v.contiguous() for k, v in state.items()}, str(tmp)))
            files = client.fetch_files(args.model, out, revision=args.revision)
        except OSError as e:  # the output side: a full disk, a directory made read-only meanwhile
            sys.stderr.write(f"weightserve fetch: {write_failure(e, out, total)}\n")
            return 1
        stats = client.last_fetch_stats
    took = f" in {stats.seconds:.2f}s" if stats is not None else ""
    sys.stdout.write(f"wrote {len(state)} tensors ({total:,} bytes{took}) to {out / name} and {len(files)} files\n")
    return 0


def run_prefetch(args: argparse.Namespace) -> int:
    with connect(args) as client:
        started = time.monotonic()
        if args.wait and sys.stderr.isatty():
            response = _prefetch_showing_progress(client, args)
        else:
            response = client.prefetch(args.model, args.world_size, args.ranks, wait=args.wait)
    ranks = f"rank{'s' * (len(args.ranks) > 1)} {' '.join(map(str, args.ranks))}" if args.ranks else "every rank"
    what = f"{args.model} ({ranks} of world size {args.world_size}, revision {response.revision})"
    if args.wait:
        sys.stdout.write(f"prefetched {what}: {response.bytes:,} bytes in {time.monotonic() - started:.2f}s\n")
    else:
        sys.stdout.write(f"prefetching {what}: {response.bytes:,} bytes, in the background\n")
    return 0


def _prefetch_showing_progress(client: WeightClient, args: argparse.Namespace) -> pb.PrefetchResponse:
    """Prefetch with wait, showing the model's bytes resident in the server's cache as they grow."""
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import wait as wait_for

    from tqdm import tqdm

    with ThreadPoolExecutor(1) as pool, tqdm(unit="B", unit_scale=True, desc=args.model, leave=False) as bar:
        call = pool.submit(client.prefetch, args.model, args.world_size, args.ranks, wait=True)
        while not wait_for([call], timeout=POLL_SECONDS).done:
            resident = max((m.cache.resident_bytes for m in client.list_models() if m.name == args.model), default=0)
            bar.update(max(resident - bar.n, 0))
        return call.result()


def run_ls(args: argparse.Namespace) -> int:
    from weightserve.v1 import weightserve_pb2 as pb

    with connect(args) as client:
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
