"""Which weight format a model directory is served in, and the files that pin it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from weightserve.errors import ModelNotFoundError
from weightserve.loaders import FORMAT_PREFERENCE, loader_for
from weightserve.storage.local import local_revision

CONFIG_FILES = ("config.json",)
"""Non-weight files whose change changes the revision (slicing reads config.json)."""


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


def model_files(model_dir: Path, fmt: str = "", remote_revision: str | None = None) -> ModelFiles:
    """The files and revision for a directory, in `fmt` or the preferred format.

    The revision is the remote one (a commit) when the files came from a remote
    source, else a hash of path, size and mtime of every file served.

    Raises:
        ModelNotFoundError: the directory has no weights (in that format).
    """
    formats = [fmt] if fmt else list(FORMAT_PREFERENCE)
    for candidate in formats:
        files = loader_for(candidate).find_files(model_dir)
        if files:
            extra = [model_dir / c for c in CONFIG_FILES if (model_dir / c).is_file()]
            revision = remote_revision or local_revision(model_dir, files + extra)
            return ModelFiles(model_dir, candidate, files, revision)
    have = available_formats(model_dir)
    wanted = f"{fmt} weights" if fmt else "weights"
    raise ModelNotFoundError(f"{model_dir.name}: no {wanted} found (formats present: {have or 'none'})")
