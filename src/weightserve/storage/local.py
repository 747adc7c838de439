"""Model names under local roots.

A model is a directory under a --model-root, named by its path relative to that root
("org/llama-7b"). The first root holding a name wins. A name that leaves its root
(`..`, an absolute path, a symlink pointing outside) is treated as absent, so a client
cannot probe the server's file system.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from weightserve.errors import ModelNotFoundError

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_MAX_DEPTH = 4


def _inside(path: Path, root: Path) -> bool:
    return os.path.commonpath([path, root]) == str(root)


class LocalRoots:
    """Resolves model names to directories under an ordered list of roots."""

    def __init__(self, roots: Iterable[Path]) -> None:
        self.roots = [Path(r).resolve() for r in roots]
        for root in self.roots:
            if not root.is_dir():
                logger.warning("model root %s is not a directory", root)

    def resolve(self, name: str) -> Path:
        """The directory of model `name`.

        Raises:
            ModelNotFoundError: no root has it, or the name escapes its root.
        """
        rel = PurePosixPath(name)
        if not name or "\\" in name or "\x00" in name or rel.is_absolute() or ".." in rel.parts:
            raise ModelNotFoundError(f"model {name!r} is not a valid model name")
        for root in self.roots:
            candidate = (root / rel).resolve()
            if _inside(candidate, root) and candidate.is_dir() and candidate != root:
                return candidate
        # No list of the models there are: with tokens, a caller may see only some of them
        # (ListModels filters), and walking every root per miss would cost a typo a scan.
        raise ModelNotFoundError(f"model {name!r} not under any --model-root (ListModels shows what is served)")

    def list_models(self) -> dict[str, Path]:
        """Every model name the roots hold, the first root winning a clash."""
        found: dict[str, Path] = {}
        for root in self.roots:
            for name, path in self._walk(root):
                found.setdefault(name, path)
        return dict(sorted(found.items()))

    def shadowed(self) -> dict[str, list[Path]]:
        """Names found under more than one root (only the first is served)."""
        seen: dict[str, list[Path]] = {}
        for root in self.roots:
            for name, _ in self._walk(root):
                seen.setdefault(name, []).append(root)
        return {name: roots for name, roots in seen.items() if len(roots) > 1}

    def _walk(self, root: Path) -> Iterable[tuple[str, Path]]:
        if not root.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            here = Path(dirpath)
            depth = len(here.relative_to(root).parts)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if depth >= _MAX_DEPTH or not _inside(here.resolve(), root):
                dirnames[:] = []
                continue
            if depth and any(f.endswith(WEIGHT_SUFFIXES) for f in filenames):
                dirnames[:] = []  # a model's subfolders are its own business
                yield here.relative_to(root).as_posix(), here


def local_revision(model_dir: Path, files: Iterable[Path]) -> str:
    """A revision for local files: a hash of path, size, mtime, inode and ctime of every file served.

    The inode and ctime make a rewrite whose mtime was set back a new revision. They also
    make the revision, and so manifest ids, differ between two copies of a model: replicas
    agree on a local model's manifest ids only when they read the same files (a shared
    volume), and a resume against another replica then starts the fetch again.
    """
    digest = hashlib.sha256()
    for path in sorted(files):
        st = path.stat()
        identity = f"{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_ctime_ns}"
        digest.update(f"{path.relative_to(model_dir).as_posix()}\0{identity}\n".encode())
    return "local-" + digest.hexdigest()[:20]
