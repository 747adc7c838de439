"""Models on the Hugging Face Hub: `hf://org/name[@revision]`.

The revision (default `main`) is resolved to a commit before anything is read, and
the model is served from that commit's snapshot in huggingface_hub's own cache
layout (`models--org--name/snapshots/<commit>/`), so the files are shared with every
other tool that uses the cache. Only what serving needs is downloaded, through allow
patterns in two steps: the index json and config/tokenizer files, then exactly the
weight files the index names (or every top-level `*.safetensors` without one). A file
lock per commit makes concurrent resolves, in this process or in another server on a
shared volume, download each file once. With HF_HUB_OFFLINE=1 nothing is downloaded:
the revision and files come from the local cache only.

Under `--coordination` (a fleet, docs/fleet.md) the same files of a commit go instead into
a disk cache of whole models, `hf://ORG/NAME@COMMIT` (`<disk cache>/hf-fleet`), as plain
files: one replica downloads a commit from the Hub and the others copy it from that
replica, as the S3 back end's models are (storage/fleet_fill.py). The revision is still
resolved by each replica (one small metadata call); the weights cross from the Hub once.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock

from weightserve.atomic import atomic_write_bytes
from weightserve.errors import (
    CorruptCheckpointError,
    ModelNotFoundError,
    PermissionDeniedError,
    UnavailableError,
)
from weightserve.storage import register_storage
from weightserve.storage.base import ModelLocation, RemoteName, Storage
from weightserve.storage.disk_cache import DiskCache, default_cache_dir
from weightserve.storage.selection import CONFIG_PATTERNS, INDEX_NAMES, matching, top_level, weight_names

if TYPE_CHECKING:
    from weightserve.config import ServerConfig

logger = logging.getLogger(__name__)

COMMIT = re.compile(r"^[0-9a-f]{40}$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_REVISION = re.compile(r"^[\w.-]+(/[\w.-]+)*$")  # a branch, tag, "refs/pr/1" or a commit


def _hub() -> object:
    try:
        return import_module("huggingface_hub")
    except ImportError as e:
        raise ModuleNotFoundError("hf:// sources need huggingface_hub: pip install 'weightserve[hf]'") from e


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def repo_folder(repo_id: str) -> str:
    """The cache folder of a model repo ('org/name' -> 'models--org--name')."""
    return "models--" + repo_id.replace("/", "--")


class HuggingFaceStorage(Storage):
    """Resolves `hf://` names to commit snapshots in a Hugging Face cache directory."""

    scheme = "hf"

    def __init__(
        self,
        cache_dir: Path,
        *,
        endpoint: str | None = None,
        offline: bool = False,
        token: str | None = None,
        threads: int = 8,
        refresh_seconds: float = 60.0,
    ) -> None:
        _hub()
        self.cache_dir = Path(cache_dir)
        self.endpoint = endpoint
        self.offline = offline
        self.token = token
        self.threads = threads
        self.refresh_seconds = refresh_seconds
        self._memo: dict[str, tuple[float, ModelLocation]] = {}
        self._lock = threading.Lock()
        self.cache: DiskCache | None = None
        """Under --coordination: whole commits as disk-cache entries the fleet shares (see the module
        docstring); None: huggingface_hub's cache."""

    @classmethod
    def from_env(cls, disk_cache_dir: Path | None = None) -> HuggingFaceStorage:
        """Settings from huggingface_hub's variables (HF_ENDPOINT, HF_HUB_OFFLINE, HF_HUB_CACHE, HF_TOKEN).

        The cache is `disk_cache_dir/hf` when the server has a disk cache directory.
        Variables are read now, not when huggingface_hub was imported.
        """
        from huggingface_hub import constants

        env = os.environ
        offline = _truthy(env["HF_HUB_OFFLINE"]) if "HF_HUB_OFFLINE" in env else constants.HF_HUB_OFFLINE
        cache = disk_cache_dir / "hf" if disk_cache_dir else Path(env.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)
        endpoint = (env.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        return cls(cache, endpoint=endpoint, offline=bool(offline), token=env.get("HF_TOKEN") or None)

    def resolve(self, remote: RemoteName) -> ModelLocation:
        """The snapshot of the commit `remote.revision` (default main) points at; blocking.

        Raises:
            ModelNotFoundError: no such repo, revision or weights; or, offline, not cached.
            CorruptCheckpointError: the index json names a file the repo lacks.
            PermissionDeniedError: a gated repo the server's token may not read.
            UnavailableError: the Hub cannot be reached.
        """
        repo_id, revision = remote.path, remote.revision or "main"
        name = f"{remote.unversioned}@{revision}"
        if not _REPO_ID.match(repo_id) or not _REVISION.match(revision) or ".." in revision.split("/"):
            raise ModelNotFoundError(f"{name}: a Hugging Face model is named hf://ORG/NAME[@REVISION]")
        with self._lock:
            memo = self._memo.get(name)
        if memo is not None and time.monotonic() < memo[0] and memo[1].model_dir.is_dir():
            return memo[1]
        with _hub_errors(name):
            if self.offline:
                commit = self._cached_commit(repo_id, revision, name)
                snapshot = self._check_cached(repo_id, commit, name)
            elif self.cache is not None:
                commit, snapshot = self._fleet_download(self.cache, repo_id, revision, name)
            else:
                commit, snapshot = self._download(repo_id, revision, name)
        if self.cache is not None and not self.offline:
            location = ModelLocation("hf", name, snapshot, f"hf-{commit}")  # plain files
        else:  # snapshot files are symlinks to ../../blobs: let them resolve inside the repo folder
            location = ModelLocation("hf", name, snapshot, f"hf-{commit}", link_root=snapshot.parent.parent)
        expires = float("inf") if revision == commit else time.monotonic() + self.refresh_seconds
        with self._lock:
            self._memo[name] = (expires, location)
        return location

    def _repo_dir(self, repo_id: str) -> Path:
        return self.cache_dir / repo_folder(repo_id)

    def _cached_commit(self, repo_id: str, revision: str, name: str) -> str:
        if COMMIT.match(revision):
            return revision
        try:
            return (self._repo_dir(repo_id) / "refs" / revision).read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            raise ModelNotFoundError(
                f"{name} is not in the Hugging Face cache at {self.cache_dir}, and HF_HUB_OFFLINE=1 forbids "
                "downloading it: download it where the Hub can be reached, or unset HF_HUB_OFFLINE"
            ) from None

    def _check_cached(self, repo_id: str, commit: str, name: str) -> Path:
        snapshot = self._repo_dir(repo_id) / "snapshots" / commit
        present = [p.name for p in snapshot.iterdir() if p.is_file()] if snapshot.is_dir() else []
        if not present:
            raise ModelNotFoundError(f"{name}: commit {commit} is not in the Hugging Face cache at {self.cache_dir}")
        weights = weight_names(present, lambda n: (snapshot / n).read_text(), name)
        missing = sorted(set(weights) - set(present))
        if missing:
            raise ModelNotFoundError(
                f"{name}: the cached snapshot {commit} lacks {missing[:5]}, "
                "and HF_HUB_OFFLINE=1 forbids downloading them"
            )
        return snapshot

    def _download(self, repo_id: str, revision: str, name: str) -> tuple[str, Path]:
        from huggingface_hub import HfApi
        from huggingface_hub.utils import filter_repo_objects

        info = HfApi(endpoint=self.endpoint, token=self.token).model_info(repo_id, revision=revision)
        commit = str(info.sha)
        if not COMMIT.match(commit):
            raise UnavailableError(f"{name}: the Hub answered {commit!r}, not a commit; is HF_ENDPOINT a Hub?")
        listing = top_level(s.rfilename for s in info.siblings or [])
        snapshot = self._repo_dir(repo_id) / "snapshots" / commit
        lock_path = self.cache_dir / ".locks" / repo_folder(repo_id) / f"weightserve-{commit}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(lock_path):
            first = list(INDEX_NAMES + CONFIG_PATTERNS)
            self._fetch(repo_id, commit, filter_repo_objects(listing, allow_patterns=first))
            weights = weight_names(listing, lambda n: (snapshot / n).read_text(), name)
            missing = sorted(set(weights) - set(listing))
            if missing:
                raise CorruptCheckpointError(f"{name}: the index names {missing[:5]}, which the repo lacks")
            self._fetch(
                repo_id,
                commit,
                filter_repo_objects(listing, allow_patterns=[glob.escape(w) for w in weights]),
            )
            if revision != commit:  # so HF_HUB_OFFLINE=1 later finds the branch
                ref = self._repo_dir(repo_id) / "refs" / revision
                ref.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(ref, commit.encode())
        return commit, snapshot

    def _fleet_download(self, cache: DiskCache, repo_id: str, revision: str, name: str) -> tuple[str, Path]:
        """The commit `revision` points at and its files as a disk-cache entry, filled through the fleet."""
        from huggingface_hub import HfApi

        info = HfApi(endpoint=self.endpoint, token=self.token).model_info(
            repo_id, revision=revision, files_metadata=True
        )
        commit = str(info.sha)
        if not COMMIT.match(commit):
            raise UnavailableError(f"{name}: the Hub answered {commit!r}, not a commit; is HF_ENDPOINT a Hub?")
        sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
        listing = top_level(sizes)
        key = f"hf://{repo_id}@{commit}"
        found = cache.lookup(key)
        if found is None:
            # a reservation: every weight file and config at the top level, at most what is downloaded
            wanted = matching(listing, [*INDEX_NAMES, *CONFIG_PATTERNS, "*.safetensors"])
            fill = partial(self._fill_directory, repo_id, commit, listing, name)
            found = cache.populate(key, sum(sizes[n] for n in wanted), fill)
        return commit, found

    def _fill_directory(self, repo_id: str, commit: str, listing: list[str], name: str, directory: Path) -> None:
        """Download what serving needs of `commit` into `directory`, as plain files (the fleet's origin fill)."""
        from huggingface_hub.utils import filter_repo_objects

        first = list(INDEX_NAMES + CONFIG_PATTERNS)
        self._fetch(repo_id, commit, filter_repo_objects(listing, allow_patterns=first), local_dir=directory)
        weights = weight_names(listing, lambda n: (directory / n).read_text(), name)
        missing = sorted(set(weights) - set(listing))
        if missing:
            raise CorruptCheckpointError(f"{name}: the index names {missing[:5]}, which the repo lacks")
        patterns = [glob.escape(w) for w in weights]
        self._fetch(repo_id, commit, filter_repo_objects(listing, allow_patterns=patterns), local_dir=directory)
        shutil.rmtree(directory / ".cache", ignore_errors=True)  # huggingface_hub's download metadata

    def _fetch(self, repo_id: str, commit: str, names: Iterable[str], local_dir: Path | None = None) -> None:
        """Download `names` at `commit` (no request at all for files already cached), into the Hub cache or
        `local_dir`."""
        from huggingface_hub import hf_hub_download

        def one(filename: str) -> str:
            return str(
                hf_hub_download(
                    repo_id,
                    filename,
                    revision=commit,
                    cache_dir=None if local_dir is not None else self.cache_dir,
                    local_dir=local_dir,
                    endpoint=self.endpoint,
                    token=self.token,
                )
            )

        names = list(names)
        if names:
            with ThreadPoolExecutor(max_workers=min(self.threads, len(names))) as pool:
                list(pool.map(one, names))


def _network_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's transport errors (httpx in new huggingface_hub, requests in old)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, attr in (
        ("httpx2", "TransportError"),
        ("httpx", "TransportError"),
        ("requests", "RequestException"),
    ):
        try:
            found.append(getattr(import_module(module), attr))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


@contextmanager
def _hub_errors(name: str) -> Iterator[None]:
    """huggingface_hub's exceptions as weightserve's, with what to do about each."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        FileMetadataError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except (LocalEntryNotFoundError, FileMetadataError) as e:  # the HEAD call failed and nothing is cached
        raise UnavailableError(f"{name}: the Hub could not be reached ({str(e).splitlines()[0]})") from e
    except GatedRepoError as e:
        raise PermissionDeniedError(f"{name} is gated: the server's HF_TOKEN has no access to it") from e
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
        raise ModelNotFoundError(f"{name}: {type(e).__name__} on the Hub ({str(e).splitlines()[0]})") from e
    except HfHubHTTPError as e:
        raise UnavailableError(f"{name}: the Hub answered an error ({str(e).splitlines()[0]})") from e
    except _network_errors() as e:
        raise UnavailableError(f"{name}: the Hub could not be reached ({e})") from e


@register_storage("hf")
def _from_config(config: ServerConfig) -> HuggingFaceStorage:
    storage = HuggingFaceStorage.from_env(config.disk_cache_dir)
    if config.coordination and not storage.offline:
        storage.cache = DiskCache((config.disk_cache_dir or default_cache_dir()) / "hf-fleet", config.disk_cache_bytes)
    return storage
