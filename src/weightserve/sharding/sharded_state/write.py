"""Writing a model saved per rank, in the file pattern vLLM's ShardedStateLoader reads.

Rank r's tensors go to `model-rank-{r}-part-{p}.safetensors`. Each part file is
streamed from the canonical checkpoint through one reused buffer (`read_range` of
each tensor's plan), so memory stays at one buffer whatever the size of the model.

Every file is written atomically (weightserve.atomic), readable by all (workers may
run as another user), and
`weightserve-sharded.json` is written last: a directory without it is incomplete. It
records every tensor's crc32c per rank, so `--check` and the server find a flipped bit.
While the writer runs, an in-progress marker tells the server not to take such a
directory for one saved by vLLM (which writes no metadata file).
"""

from __future__ import annotations

import functools
import json
import shutil
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

from weightserve import wire
from weightserve._version import __version__
from weightserve.atomic import atomic_write, fsync_dir
from weightserve.errors import InvalidRequestError
from weightserve.loaders.base import Loader
from weightserve.loaders.pieces import read_range
from weightserve.loaders.sharded_state import INCOMPLETE_NAME, METADATA_NAME
from weightserve.loaders.sources import Source
from weightserve.sharding.sharded_state.plan import ShardedStatePlan
from weightserve.sharding.tensor_plan import TensorPlan

BUFFER_BYTES = 16 * 1024 * 1024
"""Bytes read from the source and written out per step."""

OnBytes = Callable[[int], None]


def part_name(rank: int, part: int) -> str:
    """The file name vLLM's ShardedStateLoader looks for."""
    return f"model-rank-{rank}-part-{part}.safetensors"


def safetensors_header(plans: tuple[TensorPlan, ...] | list[TensorPlan]) -> bytes:
    """The length prefix and JSON header of a safetensors file holding `plans` in order.

    The header is padded with spaces so the data starts 8-byte aligned, as the
    safetensors library writes it.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for plan in plans:
        header[plan.name] = {
            "dtype": plan.dtype,
            "shape": list(plan.shape),
            "data_offsets": [offset, offset + plan.nbytes],
        }
        offset += plan.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_part(
    path: Path,
    plans: tuple[TensorPlan, ...],
    sources: list[Source],
    buffer: bytearray,
    on_bytes: OnBytes | None,
    digests: dict[str, int],
) -> None:
    """Write one safetensors file, each tensor read from its sources `len(buffer)` bytes at a time.

    Each tensor's crc32c, computed from the bytes as written, goes into `digests`.
    """
    view = memoryview(buffer)
    with path.open("wb") as f:
        f.write(safetensors_header(plans))
        for plan in plans:
            crc = 0
            for start in range(0, plan.nbytes, len(view)):
                chunk = view[: min(len(view), plan.nbytes - start)]
                read_range(plan, sources, start, chunk)
                crc = wire.crc32c(chunk, crc)
                f.write(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
            digests[plan.name] = crc


def write_sharded_state(
    plan: ShardedStatePlan,
    loader: Loader,
    out_dir: Path,
    *,
    revision: str = "",
    extra_files: Mapping[str, Path] | None = None,
    on_bytes: OnBytes | None = None,
) -> list[Path]:
    """Write `plan` into `out_dir` (new or empty), then the config files, then the metadata.

    Args:
        plan: from `plan_sharded_state` over `loader.records`.
        loader: the open canonical checkpoint the plan reads.
        out_dir: a directory that does not exist yet or is empty.
        revision: the source model's revision, recorded in the metadata.
        extra_files: relative name -> file to copy (config.json, tokenizer files).
        on_bytes: called with the number of tensor bytes after each write.

    Returns:
        Every file written, the metadata file last.

    Raises:
        InvalidRequestError: `out_dir` holds something already.
    """
    _claim(out_dir)
    written = []
    largest = max((t.nbytes for rank in plan.parts for part in rank for t in part), default=0)
    buffer = bytearray(max(1, min(BUFFER_BYTES, largest)))
    digests: dict[str, dict[str, int]] = {}
    for rank, parts in enumerate(plan.parts):
        rank_digests = digests.setdefault(str(rank), {})
        for part, plans in enumerate(parts):
            path = out_dir / part_name(rank, part)
            write = functools.partial(
                write_part, plans=plans, sources=loader.sources, buffer=buffer, on_bytes=on_bytes, digests=rank_digests
            )
            atomic_write(path, write, mode=0o644)
            written.append(path)
    for rel, source in sorted((extra_files or {}).items()):
        if Path(rel).name in (METADATA_NAME, INCOMPLETE_NAME):
            continue
        path = out_dir / rel
        atomic_write(path, functools.partial(shutil.copyfile, source), mode=0o644)
        written.append(path)
    meta = {
        "world_size": plan.world_size,
        "layout": plan.layout,
        "revision": revision,
        "model": plan.model,
        "source_format": loader.name,
        "max_part_size": plan.max_part_size,
        "files": {str(rank): [part_name(rank, p) for p in range(len(parts))] for rank, parts in enumerate(plan.parts)},
        "total_bytes": plan.total_bytes,
        "crc32c": digests,
        "writer": f"weightserve {__version__}",
    }
    fsync_dir(out_dir)  # every part is on disk before the metadata says the directory is complete

    def write_metadata(tmp: Path) -> None:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")

    atomic_write(out_dir / METADATA_NAME, write_metadata, mode=0o644)
    fsync_dir(out_dir)
    (out_dir / INCOMPLETE_NAME).unlink(missing_ok=True)
    return [*written, out_dir / METADATA_NAME]


def _claim(out_dir: Path) -> None:
    """Create `out_dir` (or accept it empty) and mark it as being written."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InvalidRequestError(
            f"{out_dir} is not an empty directory; give a new one (or remove what an interrupted run left)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / INCOMPLETE_NAME).touch()
    fsync_dir(out_dir)
