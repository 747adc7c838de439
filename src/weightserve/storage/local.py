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

from weightserve.errors import InvalidRequestError, ModelNotFoundError

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
MAX_NAME_PART_BYTES = 255
"""Longest path part of a model name: the file systems' NAME_MAX (ENAMETOOLONG beyond it)."""
_MAX_DEPTH = 4


MODEL_MARKERS = ("config.json",)
"""Besides weight files, what makes a directory a model of its own."""


def holds_weights(filenames: Iterable[str]) -> bool:
    """Whether a directory with these file names is a model (ListModels lists it)."""
    return any(f.endswith(WEIGHT_SUFFIXES) for f in filenames)


def holds_own_model(directory: Path) -> bool:
    """Whether `directory` has weights or a config of its own: another model, nested or not.

    A directory the server cannot list counts as one, so nothing in it is served for the
    model around it.
    """
    try:
        names = os.listdir(directory)
    except OSError:
        return True
    return holds_weights(names) or any(name in MODEL_MARKERS for name in names)


def _inside(path: Path, root: Path) -> bool:
    return os.path.commonpath([path, root]) == str(root)


def check_parts(name: str) -> None:
    """Refuse a name with a path part no file system can hold, before any lookup.

    Raises:
        InvalidRequestError: a part longer than MAX_NAME_PART_BYTES in UTF-8.
    """
    for part in name.split("/"):
        size = len(part.encode("utf-8", "surrogatepass"))
        if size > MAX_NAME_PART_BYTES:
            raise InvalidRequestError(
                f"model name has a path part of {size} bytes ({part[:32]!r}...); "
                f"a part is at most {MAX_NAME_PART_BYTES} bytes"
            )


def _directory(root: Path, rel: PurePosixPath) -> Path | None:
    """`root / rel` resolved, when it is a directory inside `root` other than `root`; else None.

    Any OSError of the lookup means "not a model here": the request names the path, so
    the error is the caller's (ENAMETOOLONG, ELOOP, ENOTDIR, EACCES), never the server's.
    """
    try:
        candidate = (root / rel).resolve()
        found = _inside(candidate, root) and candidate.is_dir() and candidate != root
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop on Pythons before 3.13
        logger.debug("model lookup of %s under %s failed: %s", rel, root, e)
        return None
    return candidate if found else None


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
            ModelNotFoundError: no root has it, the name escapes its root, or the file
                system cannot look it up (a symlink loop, a file where a directory should
                be, a directory the server may not search).
            InvalidRequestError: a path part longer than MAX_NAME_PART_BYTES.
        """
        rel = PurePosixPath(name)
        if not name or "\\" in name or "\x00" in name or rel.is_absolute() or ".." in rel.parts:
            raise ModelNotFoundError(f"model {name!r} is not a valid model name")
        check_parts(name)
        for root in self.roots:
            candidate = _directory(root, rel)
            if candidate is not None:
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
            if depth and holds_weights(filenames):
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
