"""`weightserve serve`: the gRPC server, configured by flags over WEIGHTSERVE_* variables."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from weightserve.config import LOADERS, ServerConfig, parse_dummy, parse_size


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--model-root", action="append", type=Path, help="directory of models (repeatable)")
    serve.add_argument("--listen", help="HOST:PORT or unix:PATH (default 127.0.0.1:50051)")
    serve.add_argument("--read-threads", type=int, help="threads reading checkpoint files (default: cores, at most 8)")
    serve.add_argument("--chunk-bytes", type=int, help="payload bytes per chunk (default 4 MiB - 16 KiB)")
    serve.add_argument("--grace-seconds", type=float, help="drain time on SIGTERM (default 30)")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING (default INFO)")
    serve.add_argument("--sharding-rules", type=Path, help="TOML rules for architectures without built-in ones")
    serve.add_argument("--cache-memory", type=parse_size, help="bytes of chunks kept in memory, e.g. 20GiB (default 0)")
    serve.add_argument("--prefetch-depth", type=int, help="chunks read ahead of each stream (default 2)")
    serve.add_argument("--eplb-window", type=int, help="expert load reports summed per model (default 1000)")
    serve.add_argument(
        "--allow-source", action="append", help="remote names clients may ask for: hf://*, s3://bucket/prefix/*"
    )
    serve.add_argument("--disk-cache-dir", type=Path, help="where remote models are downloaded")
    serve.add_argument("--disk-cache-bytes", type=parse_size, help="disk cache budget, e.g. 500GiB (default: no limit)")
    serve.add_argument(
        "--loader", choices=LOADERS, help="reader of safetensors files; fastsafetensors holds whole models in memory"
    )
    serve.add_argument(
        "--dummy", action="append", type=parse_dummy, metavar="NAME=CONFIG.json",
        help="serve generated random weights for CONFIG.json as model NAME (repeatable)",
    )  # fmt: skip
    serve.add_argument("--max-streams", type=int, help="data streams served at once (default 256)")
    serve.add_argument("--max-streams-per-peer", type=int, help="data streams from one IP or process (default 64)")
    serve.add_argument(
        "--stream-idle-seconds", type=float, help="cut a stream whose client reads nothing this long (default 60)"
    )
    serve.add_argument(
        "--metrics-listen",
        help="HOST:PORT of /metrics, /readyz and /livez (default: the --listen host, port 9400; off)",
    )
    serve.add_argument("--log-format", choices=("text", "json"), help="log lines as text (default) or JSON objects")
    serve.add_argument(
        "--allow-missing-roots", action="store_true", default=None,
        help="start even when a --model-root is missing or unreadable (a volume mounted later)",
    )  # fmt: skip
    serve.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from weightserve.server import log_setup
    from weightserve.server.lifecycle import main as serve_main

    try:
        config = _config(args)
    except ValueError as e:  # a bad or unknown setting: one line, not a traceback
        sys.stderr.write(f"weightserve serve: {e}\n")
        return 2
    log_setup.configure(config.log_level, config.log_format)
    if not config.model_roots and not config.dummy:
        sys.stderr.write("weightserve serve: give at least one --model-root or --dummy (or WEIGHTSERVE_MODEL_ROOTS)\n")
        return 2
    try:
        serve_main(config)
    except ValueError as e:  # a missing model root, a bad dummy model: found while building the server
        sys.stderr.write(f"weightserve serve: {e}\n")
        return 2
    except OSError as e:  # an address already in use, a socket path that cannot be created
        sys.stderr.write(f"weightserve serve: cannot listen ({e}); is another server running there?\n")
        return 2
    return 0


def _config(args: argparse.Namespace) -> ServerConfig:
    """The configuration: WEIGHTSERVE_* variables, overridden by the flags given."""
    return ServerConfig.from_env(
        model_roots=tuple(args.model_root) if args.model_root else None,
        listen=args.listen,
        read_threads=args.read_threads,
        chunk_bytes=args.chunk_bytes,
        grace_seconds=args.grace_seconds,
        log_level=args.log_level,
        sharding_rules=args.sharding_rules,
        cache_memory=args.cache_memory,
        prefetch_depth=args.prefetch_depth,
        eplb_window=args.eplb_window,
        allow_source=tuple(args.allow_source) if args.allow_source else None,
        disk_cache_dir=args.disk_cache_dir,
        disk_cache_bytes=args.disk_cache_bytes,
        loader=args.loader,
        dummy=tuple(args.dummy) if args.dummy else None,
        max_streams=args.max_streams,
        max_streams_per_peer=args.max_streams_per_peer,
        stream_idle_seconds=args.stream_idle_seconds,
        metrics_listen=args.metrics_listen,
        log_format=args.log_format,
        allow_missing_roots=args.allow_missing_roots,
    )
