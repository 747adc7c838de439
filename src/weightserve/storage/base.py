"""Where a model's files live, behind one interface.

Every back end ends in a local directory of files (remote ones download into a disk
cache first), so loaders only ever read local files with pread. A remote name is
`SCHEME://PATH[@REVISION]`; a name without a scheme is a local model.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

_SCHEME = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<rest>.*)$")


@dataclass(frozen=True)
class ModelLocation:
    """A model's files on local disk, and the revision that pins them."""

    source: str
    name: str
    model_dir: Path
    revision: str | None = None
    """The remote revision (a commit, an ETag digest); None for local files."""
    link_root: Path | None = None
    """Where the model's symlinks may point (a Hugging Face repo folder, whose snapshot
    files link to its blobs); None means inside model_dir only."""
    format: str = ""
    """The loader that serves the model when no directory scan decides it ("dummy")."""
    files: tuple[tuple[str, Path], ...] = ()
    """The model's files by the name a client sees, for a model that is no directory of
    its own (a dummy model is one config.json the operator named); empty otherwise."""


@dataclass(frozen=True)
class RemoteName:
    """A parsed `scheme://path[@revision]`."""

    scheme: str
    path: str
    revision: str | None

    @property
    def unversioned(self) -> str:
        return f"{self.scheme}://{self.path}"


def canonical_name(name: str) -> str:
    """The one spelling of a model name: `llama//small`, `./llama/small` and `llama/small/`
    are all `llama/small` (and `hf://org//m/@main` is `hf://org/m@main`).

    Only empty and `.` segments are dropped; anything that could escape a root (`..`, a
    leading `/`, a backslash) is kept as it is, so the resolver still refuses it.
    Every request's model name goes through this at the edge, so one model is one cache
    entry, one set of open files and one expert mapping whoever spells it.
    """
    match = _SCHEME.match(name)
    scheme, rest = (match["scheme"] + "://", match["rest"]) if match else ("", name)
    path, at, revision = rest.partition("@") if match else (rest, "", "")
    leading = "/" if path.startswith("/") and not match else ""
    parts = [part for part in path.split("/") if part not in ("", ".")]
    return f"{scheme}{leading}{'/'.join(parts)}{at}{revision}"


def parse_remote(name: str) -> RemoteName | None:
    """Split a remote model name; None for a local name."""
    match = _SCHEME.match(name)
    if match is None:
        return None
    rest = match["rest"]
    path, _, revision = rest.partition("@")
    return RemoteName(match["scheme"], path.strip("/"), revision or None)


class Storage(ABC):
    """One remote back end (Hugging Face, S3, ...)."""

    scheme: ClassVar[str]

    @abstractmethod
    def resolve(self, remote: RemoteName) -> ModelLocation:
        """Make the model's files available locally (downloading if needed); blocking.

        Raises:
            ModelNotFoundError: the remote has no such model or revision.
            UnavailableError: the remote cannot be reached.
        """
