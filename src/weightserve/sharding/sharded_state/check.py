"""Checking a saved per-rank directory: complete, consistent across ranks, and right.

Without the source model the checks are what the directory says about itself: its
metadata, a file set for every rank 0..world_size-1, the same tensor names, dtypes and
shapes on every rank, and attention shapes that match config.json's head counts. With
the source, each rank's tensors are compared with the plan `weightserve shard` writes.
Every problem is collected, so one run names them all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from weightserve import wire
from weightserve.errors import CorruptCheckpointError, InvalidRequestError
from weightserve.loaders.base import TensorRecord
from weightserve.loaders.safetensors import read_header
from weightserve.loaders.sharded_state import INCOMPLETE_NAME, METADATA_NAME, RANK_FILE
from weightserve.loaders.sources import FileSource
from weightserve.sharding.model_config import ModelConfig
from weightserve.sharding.rules import KNOWN_FAMILIES, RuleSet
from weightserve.sharding.sharded_state.plan import rank_plans
from weightserve.sharding.slicing import kv_range
from weightserve.sharding.spec import LAYOUTS, ShardSpec

Tensors = dict[str, tuple[str, tuple[int, ...]]]
"""A rank's tensors: name -> (dtype, shape)."""


@dataclass
class ShardedStateCheck:
    """What `check_sharded_state` found."""

    world_size: int = 0
    layout: str = ""
    tensors: dict[int, Tensors] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class SourceModel:
    """The canonical model a saved directory was written from."""

    records: list[TensorRecord]
    config: ModelConfig
    rules: RuleSet = field(default_factory=RuleSet)


def check_sharded_state(
    saved_dir: Path, source: SourceModel | None = None, rules: RuleSet | None = None
) -> ShardedStateCheck:
    """Check a directory written by `weightserve shard` (or saved by vLLM).

    Args:
        saved_dir: the directory.
        source: the canonical model; each rank is then compared with its plan.
        rules: operator sharding rules, for the shape checks without a source.
    """
    check = ShardedStateCheck()
    if not saved_dir.is_dir():
        check.problems.append(f"{saved_dir} is not a directory")
        return check
    meta = _read_metadata(saved_dir, check)
    files = _read_ranks(saved_dir, check, meta.digests if meta else {})
    found = max(check.tensors) + 1 if check.tensors else 0
    check.world_size, check.layout = (meta.world_size, meta.layout) if meta else (found, "vllm")
    for rank in range(check.world_size):
        if rank not in check.tensors:
            check.problems.append(f"rank {rank}: no model-rank-{rank}-part-*.safetensors file")
    for rank in sorted(r for r in check.tensors if r >= check.world_size):
        check.problems.append(f"rank {rank}: has files, but the directory is saved for world_size {check.world_size}")
    listed = {name for names in meta.files.values() for name in names} if meta else set()
    if listed:
        check.problems += [f"{name}: listed in {METADATA_NAME} but missing" for name in sorted(listed - files)]
        check.problems += [f"{name}: not listed in {METADATA_NAME}" for name in sorted(files - listed)]
    if source is not None:
        _against_source(check, source)
    else:
        _across_ranks(check)
        _against_rules(check, ModelConfig.from_dir(saved_dir), rules or RuleSet())
    return check


@dataclass(frozen=True)
class _Metadata:
    world_size: int
    layout: str
    files: dict[str, list[str]]
    digests: dict[str, dict[str, object]]


def _read_metadata(saved_dir: Path, check: ShardedStateCheck) -> _Metadata | None:
    path = saved_dir / METADATA_NAME
    if not path.is_file():
        why = (
            "`weightserve shard` did not finish (its in-progress marker is there)"
            if (saved_dir / INCOMPLETE_NAME).exists()
            else "it is written last, so the directory is incomplete (or was not written by weightserve)"
        )
        check.problems.append(f"no {METADATA_NAME}: {why}")
        return None
    try:
        meta = json.loads(path.read_text())
        world_size, layout, files = meta["world_size"], meta["layout"], meta.get("files", {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        check.problems.append(f"{METADATA_NAME}: not valid sharded-state metadata ({e})")
        return None
    if type(world_size) is not int or world_size < 1 or layout not in LAYOUTS:
        check.problems.append(
            f"{METADATA_NAME}: world_size {world_size!r} must be an integer >= 1 and layout {layout!r} one of {LAYOUTS}"
        )
        return None
    if not isinstance(files, dict) or not all(isinstance(v, list) for v in files.values()):
        check.problems.append(f"{METADATA_NAME}: 'files' must map each rank to its file names")
        files = {}
    digests = meta.get("crc32c", {})
    if not isinstance(digests, dict) or not all(isinstance(v, dict) for v in digests.values()):
        check.problems.append(f"{METADATA_NAME}: 'crc32c' must map each rank to its tensors' checksums")
        digests = {}
    return _Metadata(world_size, layout, {str(k): [str(n) for n in v] for k, v in files.items()}, digests)


def _read_ranks(saved_dir: Path, check: ShardedStateCheck, digests: dict[str, dict[str, object]]) -> set[str]:
    """Parse every rank file's header into `check.tensors`, verify each tensor's recorded
    crc32c where the metadata has one; return the rank files' names."""
    names = set()
    for path in sorted(saved_dir.iterdir()):
        if path.name.startswith(".") and "model-rank-" in path.name:
            check.problems.append(f"{path.name}: temp file of an interrupted write")
        match = RANK_FILE.match(path.name)
        if not match:
            continue
        names.add(path.name)
        recorded = digests.get(str(int(match.group(1))), {})
        try:
            source = FileSource(path)
            try:
                entries, _ = read_header(source)
                for entry in entries:
                    if entry.name in recorded and _crc_of(source, entry.begin, entry.end) != recorded[entry.name]:
                        check.problems.append(f"{path.name}: {entry.name} does not match its recorded crc32c")
            finally:
                source.close()
        except (OSError, CorruptCheckpointError) as e:
            check.problems.append(f"{path.name}: unreadable ({e})")
            continue
        tensors = check.tensors.setdefault(int(match.group(1)), {})
        for entry in entries:
            if entry.name in tensors:
                check.problems.append(f"{path.name}: {entry.name} is also in another part of rank {match.group(1)}")
            tensors[entry.name] = (entry.dtype, entry.shape)
    return names


_CRC_BUFFER = 16 * 1024 * 1024


def _crc_of(source: FileSource, begin: int, end: int) -> int:
    """crc32c of bytes [begin, end) of a file, read a bounded buffer at a time."""
    buffer = memoryview(bytearray(min(_CRC_BUFFER, max(1, end - begin))))
    crc = 0
    for at in range(begin, end, len(buffer)):
        piece = buffer[: min(len(buffer), end - at)]
        source.read_into(at, piece)
        crc = wire.crc32c(piece, crc)
    return crc


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _show(tensor: tuple[str, tuple[int, ...]]) -> str:
    return f"{tensor[0]}{list(tensor[1])}"


def _against_source(check: ShardedStateCheck, source: SourceModel) -> None:
    for rank, saved in sorted(check.tensors.items()):
        if rank >= check.world_size:
            continue
        spec = ShardSpec(model="source", rank=rank, world_size=check.world_size, layout=check.layout)
        try:
            plans = rank_plans(source.records, spec, source.config, source.rules)
        except InvalidRequestError as e:
            check.problems.append(f"the source cannot be split for world_size {check.world_size}: {e}")
            return
        expected = {p.name: (p.dtype, p.shape) for p in plans}
        missing = [name for name in expected if name not in saved]
        extra = [name for name in saved if name not in expected]
        if missing:
            check.problems.append(f"rank {rank}: {len(missing)} tensors missing: {_names(missing)}")
        if extra:
            check.problems.append(f"rank {rank}: {len(extra)} tensors not in the source's plan: {_names(extra)}")
        for name, want in expected.items():
            if name in saved and saved[name] != want:
                check.problems.append(f"rank {rank}: {name} is {_show(saved[name])}; the source gives {_show(want)}")


def _across_ranks(check: ShardedStateCheck) -> None:
    ranks = {r: t for r, t in sorted(check.tensors.items()) if r < check.world_size}
    union: dict[str, None] = {}
    for tensors in ranks.values():
        union.update(dict.fromkeys(tensors))
    for rank, tensors in ranks.items():
        lacking = [name for name in union if name not in tensors]
        if lacking:
            check.problems.append(
                f"rank {rank}: {len(lacking)} tensors missing that other ranks have: {_names(lacking)}"
            )
    for name in union:
        seen = {rank: tensors[name] for rank, tensors in ranks.items() if name in tensors}
        if len(set(seen.values())) > 1:
            shown = ", ".join(f"rank {rank} {_show(t)}" for rank, t in seen.items())
            check.problems.append(f"{name}: dtype or shape differs across ranks ({shown})")


def _against_rules(check: ShardedStateCheck, config: ModelConfig, rules: RuleSet) -> None:
    """Attention projections must have the rows their heads give each rank."""
    if config.model_type not in KNOWN_FAMILIES and not rules.operator:
        return
    first: Tensors = {}
    for rank in sorted(check.tensors, reverse=True):
        first.update(check.tensors[rank])
    for name, (_, shape) in first.items():
        try:
            kind = rules.rule_for(name, config.model_type).kind
            rows = _local_rows(kind, config, check.world_size, name)
        except InvalidRequestError as e:
            check.problems.append(str(e))
            continue
        if rows is not None and (not shape or shape[0] != rows):
            check.problems.append(
                f"{name}: shape {list(shape)}, but {config.num_attention_heads} attention and "
                f"{config.num_key_value_heads} k/v heads of size {config.head_dim} "
                f"at world_size {check.world_size} give {rows} rows"
            )


def _local_rows(kind: str, config: ModelConfig, world_size: int, name: str) -> int | None:
    """Rows of a head-split tensor on one rank, or None when the rule is not by heads."""
    if kind not in ("q", "kv", "qkv") or not config.num_attention_heads or not config.head_dim or world_size < 1:
        return None
    if config.num_attention_heads % world_size:
        raise InvalidRequestError(
            f"{name}: num_attention_heads {config.num_attention_heads} is not divisible by world_size {world_size}"
        )
    q_rows = config.num_attention_heads * config.head_dim // world_size
    kv_rows = kv_range(config, 0, world_size, name)[1]
    return {"q": q_rows, "kv": kv_rows, "qkv": q_rows + 2 * kv_rows}[kind]
