"""FetchFiles: the non-weight files a worker needs, streamed with checksums."""

from __future__ import annotations

import asyncio
import fnmatch
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

from weightserve import wire
from weightserve.errors import ModelNotFoundError, PreconditionError
from weightserve.loaders.access import reading
from weightserve.storage.base import ModelLocation
from weightserve.storage.local import WEIGHT_SUFFIXES, holds_own_model

DEFAULT_PATTERNS = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja")
"""Configs, generation config, tokenizer files and chat templates at the top level."""

_NEVER = ("*.index.json",)


@dataclass(frozen=True)
class FilePiece:
    """One chunk of one file (a FileChunk without protobuf)."""

    path: str
    offset: int
    size: int
    crc: int
    last: bool
    file_crc: int
    data: bytes


def select_files(location: ModelLocation, patterns: list[str] | None) -> list[tuple[str, Path]]:
    """(name a client sees, file) of a located model's files that match `patterns`.

    A model without a directory of its own (dummy weights) has exactly the files its
    location names; otherwise see `select_dir_files`.

    Raises:
        ModelNotFoundError: the directory holds neither weights nor a config.json at its
            top level (a folder of models such as "org" is no model whose files to send).
    """
    if not location.files:
        root = location.model_dir.resolve()
        if not holds_own_model(root):
            raise ModelNotFoundError(
                f"{location.name!r} is not a model: no weights or config.json at its top level "
                "(ListModels shows what is served)"
            )
        chosen = select_dir_files(root, patterns, location.link_root)
        return [(p.relative_to(root).as_posix(), p) for p in chosen]
    if not patterns:  # the defaults: top-level files only, as from a directory
        return [(rel, path) for rel, path in location.files if "/" not in rel and _matches(rel, list(DEFAULT_PATTERNS))]
    return [(rel, path) for rel, path in location.files if _matches(rel, patterns)]


def select_dir_files(model_dir: Path, patterns: list[str] | None, link_root: Path | None = None) -> list[Path]:
    """Regular files under `model_dir` matching `patterns` (relative, '/'-separated paths).

    Without patterns, DEFAULT_PATTERNS select top-level files only. Patterns may reach
    into sub-folders (a `tokenizer/` folder is the model's), but never into one that is a
    model of its own (weights or a config.json: "org/base/checkpoint-100" is another
    model, with its own token globs), at any depth. Weight files,
    index files, hidden files and anything resolving outside `link_root` (default: the
    model directory) are never selected.
    """
    deep = bool(patterns)
    wanted = list(patterns or DEFAULT_PATTERNS)
    root = model_dir.resolve()
    allowed = (link_root or model_dir).resolve()
    chosen = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if deep and _may_descend(here / d))
        for filename in sorted(filenames):
            path = here / filename
            rel = path.relative_to(root).as_posix()
            if filename.startswith(".") or filename.endswith(WEIGHT_SUFFIXES):
                continue
            if any(fnmatch.fnmatch(rel, p) for p in _NEVER) or not _matches(rel, wanted):
                continue
            real = path.resolve()
            if os.path.commonpath([real, allowed]) == str(allowed) and real.is_file():
                chosen.append(path)
    return chosen


def _matches(rel: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) for p in patterns)


def _may_descend(directory: Path) -> bool:
    """A sub-folder whose files belong to the model: not hidden, and no model itself (a folder
    with neither weights nor a config.json is no model, so no token scope can name it apart)."""
    return not directory.name.startswith(".") and not holds_own_model(directory)


def _file_pieces(rel: str, path: Path, chunk_bytes: int) -> Iterator[FilePiece]:
    with reading(path):  # a file the server may not read: FAILED_PRECONDITION naming it
        f = path.open("rb")
    with f:
        size = os.fstat(f.fileno()).st_size
        offset, running = 0, 0
        while True:
            data = f.read(min(chunk_bytes, size - offset))
            crc = wire.crc32c(data)
            running = wire.crc32c_combine(running, crc, len(data))
            last = offset + len(data) >= size
            if not data and not last:
                raise PreconditionError(f"{rel} shrank while being sent; fetch the files again")
            yield FilePiece(rel, offset, size, crc, last, running if last else 0, data)
            offset += len(data)
            if last:
                return


async def stream_files(files: list[tuple[str, Path]], chunk_bytes: int) -> AsyncIterator[FilePiece]:
    """Chunks of every (name, file), in the order given."""
    for rel, path in files:
        pieces = _file_pieces(rel, path, chunk_bytes)
        while True:
            piece = await asyncio.to_thread(next, pieces, None)
            if piece is None:
                break
            yield piece
