"""`weightserve serve | fetch | ls | demo`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from weightserve.errors import WeightserveError


def _serve(args: argparse.Namespace) -> int:
    from weightserve.config import ServerConfig
    from weightserve.server.app import main as serve_main

    config = ServerConfig.from_env(
        model_roots=tuple(args.model_root) if args.model_root else None,
        listen=args.listen,
        read_threads=args.read_threads,
        chunk_bytes=args.chunk_bytes,
        grace_seconds=args.grace_seconds,
        log_level=args.log_level,
        sharding_rules=args.sharding_rules,
    )
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not config.model_roots:
        sys.stderr.write("weightserve serve: give at least one --model-root (or WEIGHTSERVE_MODEL_ROOTS)\n")
        return 2
    serve_main(config)
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from weightserve.checkpoints import atomic_write
    from weightserve.client import WeightClient

    out = Path(args.out)
    with WeightClient(args.server) as client:
        state = client.fetch_state_dict(
            args.model, rank=args.rank, world_size=args.world_size, revision=args.revision, format=args.format
        )
        name = "model.safetensors" if args.world_size == 1 else f"model-rank-{args.rank}-part-0.safetensors"
        atomic_write(out / name, lambda tmp: save_file({k: v.contiguous() for k, v in state.items()}, str(tmp)))
        files = client.fetch_files(args.model, out, revision=args.revision)
    total = sum(t.numel() * t.element_size() for t in state.values())
    sys.stdout.write(f"wrote {len(state)} tensors ({total:,} bytes) to {out / name} and {len(files)} files\n")
    return 0


def _ls(args: argparse.Namespace) -> int:
    from weightserve.client import WeightClient

    with WeightClient(args.server) as client:
        models = client.list_models()
    rows = [("MODEL", "FORMAT", "BYTES", "REVISION", "FORMATS")]
    rows += [(m.name, m.format, f"{m.total_bytes:,}", m.revision, ",".join(m.formats)) for m in models]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        sys.stdout.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() + "\n")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from weightserve.demo import main as demo_main

    return demo_main()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weightserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--model-root", action="append", type=Path, help="directory of models (repeatable)")
    serve.add_argument("--listen", help="HOST:PORT or unix:PATH (default 127.0.0.1:50051)")
    serve.add_argument("--read-threads", type=int, help="threads reading checkpoint files (default 8)")
    serve.add_argument("--chunk-bytes", type=int, help="payload bytes per chunk (default 4 MiB - 16 KiB)")
    serve.add_argument("--grace-seconds", type=float, help="drain time on SIGTERM (default 30)")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING (default INFO)")
    serve.add_argument("--sharding-rules", type=Path, help="TOML rules for architectures without built-in ones")
    serve.set_defaults(run=_serve)

    fetch = sub.add_parser("fetch", help="fetch a rank's state dict and the model's files")
    fetch.add_argument("model")
    fetch.add_argument("--server", required=True, help="HOST:PORT or unix:PATH")
    fetch.add_argument("--out", required=True, help="directory to write into")
    fetch.add_argument("--rank", type=int, default=0)
    fetch.add_argument("--world-size", type=int, default=1)
    fetch.add_argument("--revision")
    fetch.add_argument("--format")
    fetch.set_defaults(run=_fetch)

    ls = sub.add_parser("ls", help="list the server's models")
    ls.add_argument("--server", required=True)
    ls.set_defaults(run=_ls)

    demo = sub.add_parser("demo", help="serve and fetch a generated tiny Llama, verifying every bit")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except WeightserveError as e:
        sys.stderr.write(f"weightserve {args.command}: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
