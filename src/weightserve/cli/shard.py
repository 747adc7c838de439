"""`weightserve shard`: save a model per rank as vLLM's sharded_state files, or check a saved directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from weightserve.cli.output import write_failure
from weightserve.cli.remote import positive_int
from weightserve.config import parse_size

if TYPE_CHECKING:
    from weightserve.loaders.formats import ModelFiles


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    shard = sub.add_parser("shard", help="save a model per rank (vLLM's sharded_state files), or --check one")
    shard.add_argument("model", nargs="?", help="model directory, or a name under --model-root")
    shard.add_argument("--world-size", type=positive_int, help="tensor-parallel size to save for")
    shard.add_argument("--out", type=Path, help="new or empty directory to write")
    shard.add_argument("--max-part-size", type=parse_size, help="cap on a part file's bytes, e.g. 5GiB")
    shard.add_argument("--layout", choices=("checkpoint", "vllm"), default="checkpoint", help="names to save")
    shard.add_argument("--model-root", action="append", type=Path, help="directory of models (repeatable)")
    shard.add_argument("--sharding-rules", type=Path, help="TOML rules for other architectures")
    shard.add_argument("--check", type=Path, metavar="DIR", help="validate a saved directory instead")
    shard.add_argument("--source", help="with --check: the canonical model to compare every rank with")
    shard.set_defaults(run=run_shard)


def shard_source(model: str, roots: list[Path] | None) -> ModelFiles:
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


def run_shard(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from weightserve.loaders import loader_for
    from weightserve.server.file_stream import select_dir_files
    from weightserve.sharding.model_config import ModelConfig
    from weightserve.sharding.rules import RuleSet, load_rules
    from weightserve.sharding.sharded_state.check import SourceModel, check_sharded_state
    from weightserve.sharding.sharded_state.plan import plan_sharded_state
    from weightserve.sharding.sharded_state.write import write_sharded_state

    rules = load_rules(args.sharding_rules) if args.sharding_rules else RuleSet()
    if args.check:
        if args.source:
            found = shard_source(args.source, args.model_root)
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
    found = shard_source(args.model, args.model_root)
    extra = {p.relative_to(found.model_dir).as_posix(): p for p in select_dir_files(found.model_dir, None)}
    with loader_for(found.format)(found.files) as loader:
        config = ModelConfig.from_dir(found.model_dir)
        plan = plan_sharded_state(
            loader.records, config, model=args.model, world_size=args.world_size,
            layout=args.layout, max_part_size=args.max_part_size, rules=rules,
        )  # fmt: skip
        tty = sys.stderr.isatty()
        try:
            with tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="shard", disable=not tty) as bar:
                written = write_sharded_state(
                    plan, loader, args.out, revision=found.revision, extra_files=extra, on_bytes=bar.update
                )
        except OSError as e:  # the output side: a full disk, a read-only or forbidden directory
            sys.stderr.write(f"weightserve shard: {write_failure(e, args.out, plan.total_bytes)}\n")
            return 1
    sys.stdout.write(f"wrote {len(written)} files ({plan.total_bytes:,} tensor bytes) to {args.out}\n")
    return 0
