"""Which weight format a model directory is served in, and the files that pin it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from weightserve.errors import ModelNotFoundError
from weightserve.loaders import FORMAT_PREFERENCE, loader_for
from weightserve.loaders.access import reading
from weightserve.storage.base import ModelLocation
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
        """Bytes the model serves: its weight files' size, or what its loader generates."""
        served = loader_for(self.format).served_bytes(self.files)
        return served if served is not None else sum(p.stat().st_size for p in self.files)


def _check_inside(model_dir: Path, files: list[Path], root: Path) -> None:
    allowed = root.resolve()
    for path in files:
        real = path.resolve()
        if os.path.commonpath([real, allowed]) != str(allowed):
            raise ModelNotFoundError(
                f"{model_dir.name}: weight file {path.name} resolves outside the model's directory; not served"
            )


def files_at(location: ModelLocation, fmt: str = "") -> ModelFiles:
    """What a located model serves: its directory's files, or the files the location names.

    Raises:
        ModelNotFoundError: no weights (in that format).
    """
    if not location.format:
        return model_files(location.model_dir, fmt, location.revision, location.link_root)
    if fmt and fmt != location.format:
        raise ModelNotFoundError(f"{location.name}: no {fmt} weights found (formats present: {[location.format]})")
    files = [path for _, path in location.files]
    return ModelFiles(location.model_dir, location.format, files, location.revision or "")


def formats_at(location: ModelLocation) -> list[str]:
    """Formats a located model can be served in, in preference order."""
    return [location.format] if location.format else available_formats(location.model_dir)


def available_formats(model_dir: Path) -> list[str]:
    """Formats the directory has weights for, in serving preference order.

    Raises:
        PreconditionError: the server may not read an index json or the directory, so
            cannot tell; a listing skips the model rather than fail for every model.
    """
    with reading(model_dir):
        return [fmt for fmt in FORMAT_PREFERENCE if loader_for(fmt).find_files(model_dir)]


def model_files(
    model_dir: Path, fmt: str = "", remote_revision: str | None = None, link_root: Path | None = None
) -> ModelFiles:
    """The files and revision for a directory, in `fmt` or the preferred format.

    The revision is the remote one (a commit) when the files came from a remote
    source, else a hash of every served file's identity (see local_revision).

    Raises:
        ModelNotFoundError: the directory has no weights (in that format), or a weight
            file resolves outside `link_root` (default: the directory), as a symlink out would.
        PreconditionError: the server may not read an index json or the directory.
    """
    formats = [fmt] if fmt else list(FORMAT_PREFERENCE)
    for candidate in formats:
        with reading(model_dir):
            files = loader_for(candidate).find_files(model_dir)
        if files:
            _check_inside(model_dir, files, link_root or model_dir)
            extra = [model_dir / c for c in CONFIG_FILES if (model_dir / c).is_file()]
            revision = remote_revision or local_revision(model_dir, files + extra)
            return ModelFiles(model_dir, candidate, files, revision)
    have = available_formats(model_dir)
    wanted = f"{fmt} weights" if fmt else "weights"
    raise ModelNotFoundError(f"{model_dir.name}: no {wanted} found (formats present: {have or 'none'})")
