"""`weightserve serve | fetch | ls | shard | rebalance | demo`."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from weightserve import rebalance_cli
from weightserve.config import LOADERS, parse_dummy, parse_size
from weightserve.errors import WeightserveError

if TYPE_CHECKING:
    from weightserve.loaders.formats import ModelFiles


def _serve(args: argparse.Namespace) -> int:
    from weightserve.config import ServerConfig
    from weightserve.server.lifecycle import main as serve_main

    config = ServerConfig.from_env(
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
    )
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not config.model_roots and not config.dummy:
        sys.stderr.write("weightserve serve: give at least one --model-root or --dummy (or WEIGHTSERVE_MODEL_ROOTS)\n")
        return 2
    serve_main(config)
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from weightserve.atomic import atomic_write
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


def _demo(args: argparse.Namespace) -> int:
    from weightserve.demo import main as demo_main

    return demo_main()


def _shard_source(model: str, roots: list[Path] | None) -> ModelFiles:
    """The canonical weights of MODEL: a name under --model-root, or a directory path."""
    from weightserve.errors import ModelNotFoundError
    from weightserve.loaders.formats import available_formats, model_files
    from weightserve.storage.local import LocalRoots

    try:
        model_dir = LocalRoots(roots or []).resolve(model)
    except ModelNotFoundError:
        if not Path(model).is_dir():
            raise
        model_dir = Path(model).resolve()
    have = available_formats(model_dir)
    formats = [f for f in have if f != "sharded_state"]
    if not formats:
        raise ModelNotFoundError(f"{model}: no canonical checkpoint to shard (formats: {have or 'none'})")
    return model_files(model_dir, formats[0])


def _shard(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from weightserve.loaders import loader_for
    from weightserve.server.file_stream import select_files
    from weightserve.sharding.model_config import ModelConfig
    from weightserve.sharding.rules import RuleSet, load_rules
    from weightserve.sharding.sharded_state.check import SourceModel, check_sharded_state
    from weightserve.sharding.sharded_state.plan import plan_sharded_state
    from weightserve.sharding.sharded_state.write import write_sharded_state

    rules = load_rules(args.sharding_rules) if args.sharding_rules else RuleSet()
    if args.check:
        if args.source:
            found = _shard_source(args.source, args.model_root)
            with loader_for(found.format)(found.files) as loader:
                source = SourceModel(loader.records, ModelConfig.from_dir(found.model_dir), rules)
                check = check_sharded_state(args.check, source)
        else:
            check = check_sharded_state(args.check, rules=rules)
        sys.stdout.writelines(f"{args.check}: {problem}\n" for problem in check.problems)
        if check.problems:
            sys.stderr.write(f"weightserve shard --check: {len(check.problems)} problem(s) in {args.check}\n")
            return 1
        tensors = len(check.tensors.get(0, {}))
        summary = f"world_size {check.world_size}, layout {check.layout}, {tensors} tensors on rank 0"
        sys.stdout.write(f"{args.check}: ok ({summary})\n")
        return 0
    if not (args.model and args.world_size and args.out):
        sys.stderr.write("weightserve shard: give MODEL, --world-size and --out (or --check DIR)\n")
        return 2
    found = _shard_source(args.model, args.model_root)
    extra = {p.relative_to(found.model_dir).as_posix(): p for p in select_files(found.model_dir, None)}
    with loader_for(found.format)(found.files) as loader:
        config = ModelConfig.from_dir(found.model_dir)
        plan = plan_sharded_state(
            loader.records, config, model=args.model, world_size=args.world_size,
            layout=args.layout, max_part_size=args.max_part_size, rules=rules,
        )  # fmt: skip
        tty = sys.stderr.isatty()
        with tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="shard", disable=not tty) as bar:
            written = write_sharded_state(
                plan, loader, args.out, revision=found.revision, extra_files=extra, on_bytes=bar.update
            )
    sys.stdout.write(f"wrote {len(written)} files ({plan.total_bytes:,} tensor bytes) to {args.out}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weightserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

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

    shard = sub.add_parser("shard", help="save a model per rank (vLLM's sharded_state files), or --check one")
    shard.add_argument("model", nargs="?", help="model directory, or a name under --model-root")
    shard.add_argument("--world-size", type=int, help="tensor-parallel size to save for")
    shard.add_argument("--out", type=Path, help="new or empty directory to write")
    shard.add_argument("--max-part-size", type=parse_size, help="cap on a part file's bytes, e.g. 5GiB")
    shard.add_argument("--layout", choices=("checkpoint", "vllm"), default="checkpoint", help="names to save")
    shard.add_argument("--model-root", action="append", type=Path, help="directory of models (repeatable)")
    shard.add_argument("--sharding-rules", type=Path, help="TOML rules for other architectures")
    shard.add_argument("--check", type=Path, metavar="DIR", help="validate a saved directory instead")
    shard.add_argument("--source", help="with --check: the canonical model to compare every rank with")
    shard.set_defaults(run=_shard)

    rebalance_cli.add_parser(sub)

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
