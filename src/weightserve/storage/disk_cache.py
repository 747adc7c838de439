"""A size-bounded disk cache of whole remote models, safe to share between processes.

Layout under the cache's root:

    <slug>/files/...     a published model: the directory the loaders read
    <slug>/entry.json    its completion marker (key, bytes, files); its mtime is the last use
    <slug>.partial/      a download in progress, never served
    <slug>.<token>.partial/  the same under a fleet lease token (storage/fleet_fill.py)
    .locks/<slug>.lock   held while that model is downloaded or removed (token or not)
    .trash/              models being removed

A model is downloaded into `<slug>.partial`, every file written atomically (temp file in
the same directory, fsync, rename); the marker is written last and the directory renamed
into place, so a published directory is always complete. Eviction is LRU over whole
models and skips a model being downloaded (its lock is held) or in use (`in_use`, by
default: a file of it is open in this process, which is how the model cache holds the
models it serves). A removed model is renamed into `.trash` first, so no reader ever
sees half of one; streams already reading it keep their open files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock, Timeout

from weightserve.atomic import atomic_write_bytes, atomic_write_text, fsync_dir
from weightserve.errors import ResourceExhaustedError, UnavailableError

if TYPE_CHECKING:
    from weightserve.storage.fleet_fill import FleetFill

logger = logging.getLogger(__name__)

MARKER = "entry.json"
UNFINISHED_SUFFIX = ".fill"
"""What a file being written into a download directory is called until it is whole; never published."""
_RESERVED = "reserved"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_PARTIAL = re.compile(r"(?P<slug>.*-[0-9a-f]{12})(?:\.\d+)?\.partial")
"""A download directory: the slug (which ends in its hash, never in `.<digits>`), a lease token or none."""


def default_cache_dir() -> Path:
    """Where remote models go when no --disk-cache-dir is given: $XDG_CACHE_HOME/weightserve."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "weightserve"


def slug(key: str) -> str:
    """A directory name for `key`: readable, and unique through a hash suffix."""
    readable = _UNSAFE.sub("--", key).strip("-.")[:80]
    return f"{readable}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def open_in_this_process(path: Path) -> bool:
    """Whether this process holds a file under `path` open (Linux; False elsewhere)."""
    fd_dir = "/proc/self/fd"
    if not os.path.isdir(fd_dir):
        return False
    prefix = str(path.resolve()) + os.sep
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(os.path.join(fd_dir, fd)).startswith(prefix):
                return True
        except OSError:
            continue
    return False


def _damage(entry: Path) -> str | None:
    """What is wrong with a published model's files against its marker's sizes, or None.

    A marker written before sizes were recorded, or one unreadable meanwhile (the model
    removed by another process), is not judged here.
    """
    try:
        sizes = json.loads((entry / MARKER).read_text()).get("sizes")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(sizes, dict):
        return None
    for name, size in sizes.items():
        try:
            found = (entry / "files" / name).stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as e:
            return f"{name} cannot be read ({e.strerror})"
        if found != size:
            return f"{name} is {found} bytes, not the {size} it was published with"
    return None


@dataclass(frozen=True)
class CachedModel:
    """One published model in the cache."""

    key: str
    path: Path
    bytes: int
    last_use: float

    @property
    def files_dir(self) -> Path:
        return self.path / "files"


class DiskCache:
    """Whole models on disk under a byte budget (0: unbounded), LRU by last use.

    Example:
        >>> cache = DiskCache(tmp / "s3", budget_bytes=10 << 30)  # doctest: +SKIP
        >>> model_dir = cache.lookup(key) or cache.populate(key, nbytes, download_into)  # doctest: +SKIP
    """

    def __init__(self, root: Path, budget_bytes: int = 0, in_use: Callable[[Path], bool] | None = None) -> None:
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self.in_use = in_use or open_in_this_process
        self.downloads = 0
        """Models this process downloaded into the cache (for the metrics)."""
        self.fleet: FleetFill | None = None
        """Set by the server under --coordination: populate then coordinates with the other replicas."""
        for sub in (".locks", ".trash"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def lookup(self, key: str) -> Path | None:
        """The files directory of a published model, marking it used; None if absent or damaged.

        A published file whose size is no longer the one recorded (truncated, rewritten,
        deleted by hand or by a failing disk) would be served as it is, or fail every
        fetch of the model until someone cleared the cache by hand; the model is moved
        to the trash instead and the caller downloads it again. A stat per file, so
        cheap enough for every lookup; a flipped byte of the same size is not seen here
        (the checksums the client verifies are computed from what is read).
        """
        entry = self.root / slug(key)
        try:
            os.utime(entry / MARKER)
        except FileNotFoundError:
            return None
        damage = _damage(entry)
        if damage is not None:
            logger.warning("disk cache: %s is damaged (%s); downloading it again", key, damage)
            self._discard(entry)
            return None
        return entry / "files"

    def _discard(self, entry: Path) -> None:
        """Move a damaged model out of the way at once (streams reading it keep their open files)."""
        trash = self.root / ".trash" / f"{entry.name}.{os.getpid()}.{time.monotonic_ns()}"
        try:
            os.rename(entry, trash)
        except FileNotFoundError:
            return  # another process discarded it first
        shutil.rmtree(trash, ignore_errors=True)

    def populate(self, key: str, expected_bytes: int, fill: Callable[[Path], None]) -> Path:
        """Publish `key` by calling `fill(directory)`, unless another process already did.

        Concurrent calls for one key, from threads or processes, run `fill` once; the
        others wait and get the published directory. With `fleet` set (--coordination),
        one replica of the fleet runs `fill` (the origin download) and the others copy
        its published directory from it (storage/fleet_fill.py).

        Raises:
            ResourceExhaustedError: the model does not fit the budget beside models in use.
        """
        if self.fleet is not None:
            return self.fleet.populate(self, key, expected_bytes, fill)
        return self.populate_here(key, expected_bytes, fill)

    def populate_here(self, key: str, expected_bytes: int, fill: Callable[[Path], None], token: int = 0) -> Path:
        """`populate` within this cache only: `fill` runs here, whatever other replicas do.

        `token`: the fleet's lease token of the copy (storage/coordination.py), kept in the
        marker so a replica serves another only the copy Redis names; 0 outside a fleet.
        """
        name = slug(key)
        with self._lock(name):
            found = self.lookup(key)
            if found is not None:
                return found
            # A fleet download goes into a directory named by its lease token, so no two
            # leaseholders (one of them stale) ever write into the same one.
            partial = self.root / (f"{name}.{token}.partial" if token else f"{name}.partial")
            with self._lock("budget"):
                self._make_room(expected_bytes, keep=name)
                for stale in (self.root / f"{name}.partial", *self.root.glob(f"{name}.*.partial")):
                    shutil.rmtree(stale, ignore_errors=True)  # crashed downloads' leftovers
                (partial / "files").mkdir(parents=True)
                atomic_write_text(partial / _RESERVED, str(expected_bytes))
            try:
                fill(partial / "files")
                self._publish(key, partial, self.root / name, token)
                self.downloads += 1
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise
        logger.info("disk cache: stored %s (%d bytes) in %s", key, expected_bytes, self.root / name)
        return self.root / name / "files"

    def published_files(self, key: str) -> tuple[Path, list[str], int] | None:
        """A published model's files directory, its files (relative, '/'-separated, sorted) and its fleet
        token (0 outside a fleet); None if absent."""
        entry = self.root / slug(key)
        try:
            meta = json.loads((entry / MARKER).read_text())
        except (OSError, ValueError):
            return None
        if meta.get("key") != key:
            return None
        return entry / "files", sorted(str(f) for f in meta.get("files", [])), int(meta.get("token", 0))

    def entries(self) -> list[CachedModel]:
        """Published models, least recently used first."""
        found = []
        for path in self.root.iterdir():
            if path.name.startswith(".") or path.name.endswith(".partial"):
                continue
            try:
                marker = path / MARKER
                meta = json.loads(marker.read_text())
                found.append(CachedModel(meta["key"], path, int(meta["bytes"]), marker.stat().st_mtime))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # removed meanwhile, or not ours
        return sorted(found, key=lambda e: e.last_use)

    def used_bytes(self) -> int:
        """Bytes of published models plus those reserved by downloads in progress."""
        return sum(e.bytes for e in self.entries()) + self._reserved_bytes()

    def evict(self, key: str) -> bool:
        """Remove a model unless it is being downloaded or in use; True if removed."""
        entry = next((e for e in self.entries() if e.key == key), None)
        return entry is not None and self._remove(entry)

    def _lock(self, name: str, timeout: float = -1) -> FileLock:
        return FileLock(self.root / ".locks" / f"{name}.lock", timeout=timeout)

    def _publish(self, key: str, partial: Path, final: Path, token: int = 0) -> None:
        files_dir = partial / "files"
        files = sorted(p.relative_to(files_dir).as_posix() for p in files_dir.rglob("*") if p.is_file())
        unfinished = [f for f in files if f.endswith(UNFINISHED_SUFFIX)]
        if unfinished:  # the fill returned without finishing them: never make that copy permanent
            raise UnavailableError(f"{key}: the download left unfinished files {unfinished[:3]}; not publishing it")
        sizes = {f: (files_dir / f).stat().st_size for f in files}
        total = sum(sizes.values())
        fsync_dir(files_dir)
        (partial / _RESERVED).unlink()
        marker = {"key": key, "bytes": total, "files": files, "sizes": sizes, **({"token": token} if token else {})}
        atomic_write_bytes(partial / MARKER, json.dumps(marker).encode())
        fsync_dir(partial)
        if final.exists():  # not ours (no marker); keep the name free for the complete model
            os.rename(final, self.root / ".trash" / f"{final.name}.{os.getpid()}.{time.monotonic_ns()}")
        os.rename(partial, final)
        fsync_dir(self.root)

    def _reserved_bytes(self) -> int:
        total = 0
        for partial in self.root.glob("*.partial"):
            try:
                total += int((partial / _RESERVED).read_text())
            except (OSError, ValueError):
                continue
        return total

    def _make_room(self, need: int, keep: str) -> None:
        """Evict least recently used models until `need` more bytes fit (budget lock held)."""
        self._drop_stale_partials(keep)
        if not self.budget_bytes:
            return
        if need > self.budget_bytes:
            raise ResourceExhaustedError(
                f"model needs {need} bytes, more than the whole disk cache budget "
                f"({self.budget_bytes} bytes); raise --disk-cache-bytes"
            )
        entries = self.entries()
        used = sum(e.bytes for e in entries) + self._reserved_bytes()
        for entry in entries:
            if used + need <= self.budget_bytes:
                return
            if entry.path.name != keep and self._remove(entry):
                used -= entry.bytes
        if used + need > self.budget_bytes:
            raise ResourceExhaustedError(
                f"disk cache holds {used} of {self.budget_bytes} bytes in models in use or downloading; "
                f"{need} more do not fit: retry later or raise --disk-cache-bytes"
            )

    def _drop_stale_partials(self, keep: str) -> None:
        """Remove the download directories of crashed downloads: those whose model's lock no one holds.

        The lock is the model's slug whether the directory carries a lease token or not,
        since that is the lock `populate_here` holds while it downloads.
        """
        for partial in self.root.glob("*.partial"):
            match = _PARTIAL.fullmatch(partial.name)
            if match is None:
                continue  # not a download of ours
            name = match["slug"]
            if name == keep:
                continue
            lock = self._lock(name, timeout=0)
            try:
                with lock:
                    shutil.rmtree(partial, ignore_errors=True)  # no one holds its lock: a crashed download
            except Timeout:
                continue

    def _remove(self, entry: CachedModel) -> bool:
        try:
            with self._lock(entry.path.name, timeout=0):
                if self.in_use(entry.path):
                    return False
                trash = self.root / ".trash" / f"{entry.path.name}.{os.getpid()}.{time.monotonic_ns()}"
                os.rename(entry.path, trash)
        except Timeout:
            return False  # being downloaded or removed elsewhere
        except FileNotFoundError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        logger.info(
            "disk cache: evicted %s (%d bytes, last used %.0fs ago)",
            entry.key,
            entry.bytes,
            time.time() - entry.last_use,
        )
        return True
