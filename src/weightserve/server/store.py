"""Open models, one copy each, shared by every stream that reads them.

A model is opened (headers parsed, files opened) once per (name, format, revision)
and reference-counted by the streams using it. When its files change on disk, the
next request opens the new revision; the old copy stays usable by streams in flight
and is closed when the last of them ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from weightserve.errors import ModelNotFoundError, PreconditionError
from weightserve.loaders import FORMAT_PREFERENCE, loader_for
from weightserve.loaders.base import Loader
from weightserve.sharding.model_config import ModelConfig
from weightserve.sharding.plan import TensorPlan
from weightserve.storage.local import LocalRoots, local_revision

logger = logging.getLogger(__name__)

CONFIG_FILES = ("config.json",)
"""Non-weight files whose change changes the revision (slicing reads config.json)."""


@dataclass
class OpenModel:
    """A checkpoint opened for serving."""

    name: str
    model_dir: Path
    format: str
    revision: str
    loader: Loader
    model_config: ModelConfig
    plans: dict[str, list[TensorPlan]] = field(default_factory=dict)
    digests: dict[tuple[str, str], int] = field(default_factory=dict)
    users: int = 0
    retired: bool = False

    def close_if_unused(self) -> None:
        if self.retired and self.users == 0:
            self.loader.close()
            logger.info("closed %s (%s, %s)", self.name, self.format, self.revision)


@dataclass(frozen=True)
class ModelFiles:
    """What a model directory serves in one format, and the revision that pins it."""

    model_dir: Path
    format: str
    files: list[Path]
    revision: str

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


def available_formats(model_dir: Path) -> list[str]:
    """Formats the directory has weights for, in serving preference order."""
    return [fmt for fmt in FORMAT_PREFERENCE if loader_for(fmt).find_files(model_dir)]


def model_files(model_dir: Path, fmt: str = "") -> ModelFiles:
    """The files and revision for a directory, in `fmt` or the preferred format.

    Raises:
        ModelNotFoundError: the directory has no weights (in that format).
    """
    formats = [fmt] if fmt else list(FORMAT_PREFERENCE)
    for candidate in formats:
        files = loader_for(candidate).find_files(model_dir)
        if files:
            extra = [model_dir / c for c in CONFIG_FILES if (model_dir / c).is_file()]
            return ModelFiles(model_dir, candidate, files, local_revision(model_dir, files + extra))
    have = available_formats(model_dir)
    wanted = f"{fmt} weights" if fmt else "weights"
    raise ModelNotFoundError(f"{model_dir.name}: no {wanted} found (formats present: {have or 'none'})")


class ModelStore:
    """Opens models on demand and shares each open copy."""

    def __init__(self, roots: LocalRoots) -> None:
        self.roots = roots
        self._open: dict[tuple[str, str], OpenModel] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    @asynccontextmanager
    async def use(self, name: str, fmt: str = "", revision: str = "") -> AsyncIterator[OpenModel]:
        """Hold an open model for the duration of a request.

        Raises:
            ModelNotFoundError: unknown model or format.
            PreconditionError: `revision` is pinned and the files now have another.
        """
        model = await self._acquire(name, fmt, revision)
        try:
            yield model
        finally:
            model.users -= 1
            model.close_if_unused()

    async def _acquire(self, name: str, fmt: str, revision: str) -> OpenModel:
        model_dir = await asyncio.to_thread(self.roots.resolve, name)
        found = await asyncio.to_thread(model_files, model_dir, fmt)
        if revision and revision != found.revision:
            raise PreconditionError(
                f"model {name!r} is at revision {found.revision}, not the pinned {revision}; "
                "its files changed: fetch the manifest again"
            )
        key = (name, found.format)
        async with self._locks.setdefault(key, asyncio.Lock()):  # one open per model at a time
            current = self._open.get(key)
            if current is None or current.revision != found.revision:
                loader = await asyncio.to_thread(loader_for(found.format), found.files)
                try:
                    model_config = await asyncio.to_thread(ModelConfig.from_dir, model_dir)
                except BaseException:
                    loader.close()
                    raise
                if current is not None:
                    current.retired = True
                    current.close_if_unused()
                current = OpenModel(name, model_dir, found.format, found.revision, loader, model_config)
                self._open[key] = current
                logger.info(
                    "opened %s: %s, %d tensors, %d bytes, revision %s",
                    name, found.format, len(loader.records), loader.total_bytes(), found.revision,
                )
            current.users += 1
            return current

    def evict(self, name: str) -> bool:
        """Drop every open copy of `name`; streams in flight keep theirs until they end."""
        keys = [key for key in self._open if key[0] == name]
        for key in keys:
            model = self._open.pop(key)
            model.retired = True
            model.close_if_unused()
        return bool(keys)

    def close(self) -> None:
        """Close everything (at shutdown, after streams have drained)."""
        for name in {key[0] for key in self._open}:
            self.evict(name)
