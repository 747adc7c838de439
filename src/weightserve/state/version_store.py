"""Published versions of a model's weights, on disk under `--state-dir`.

A model's checkpoint under its root is version 0. Each publish adds the next number,
written as `versions/<model>/v<N>.json` only once every tensor it carries is complete
on disk, so a version is visible whole or not at all. A version's file lists the
tensors that differ from the checkpoint, each as a blob named by the SHA-256 of its
bytes (`blobs/<sha256>`): a tensor unchanged since the base is the base's entry, so
unchanged tensors are never stored twice, and neither are identical bytes.

Uploads (`uploads/<id>/`) hold the declared tensors and one part file per tensor,
appended chunk by chunk after the chunk's crc32c checks; a finished tensor's part file
becomes its blob. An upload survives a restart: how far each part got is how far the
upload got. Blocking I/O throughout: the server calls this off its event loop.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from weightserve import wire
from weightserve.atomic import atomic_write, fsync_dir, fsync_path
from weightserve.errors import IntegrityError, InvalidRequestError, PreconditionError, UploadNotFoundError

logger = logging.getLogger(__name__)

_UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")
_VERSION_FILE = re.compile(r"^v(\d+)\.json$")
HASH_BLOCK = 8 << 20
MAX_COMMITTED_KEPT = 4096


@dataclass(frozen=True)
class Declared:
    """A tensor an upload carries: its name, dtype, shape and byte size."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class StoredTensor:
    """A tensor of a version that differs from the checkpoint: its blob and what it is."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    blob: str
    crc32c: int = 0
    """crc32c of the bytes, checked before the blob is served."""


@dataclass(frozen=True)
class Version:
    """One published version: what differs from the checkpoint, and what the upload carried."""

    model: str
    version: int
    base_version: int
    base_revision: str
    format: str
    created_ms: int
    tensors: Mapping[str, StoredTensor]
    """Every tensor that differs from the checkpoint (version 0), by name."""
    published: tuple[str, ...] = ()
    """The tensors this version's upload carried."""
    bytes_published: int = 0

    @functools.cached_property
    def content_digest(self) -> str:
        """16 hex digits naming what this version serves, whoever numbered it.

        Two servers can each hold a "version 1" with other bytes (a publish taken by
        another replica while the owner was away, an owner that lost its state dir); a
        revision that pins only the number would let a stream resumed across them mix
        the two. Blob names are sha256 digests of the bytes, so this hashes content.
        """
        tensors = sorted((name, t.dtype, list(t.shape), t.blob) for name, t in self.tensors.items())
        text = json.dumps([self.base_revision, self.format, tensors], separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        data = asdict(self)
        data["tensors"] = {name: asdict(t) for name, t in self.tensors.items()}
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Version:
        data = json.loads(text)
        tensors = {
            name: StoredTensor(t["dtype"], tuple(t["shape"]), int(t["nbytes"]), str(t["blob"]), int(t["crc32c"]))
            for name, t in data["tensors"].items()
        }
        return cls(
            str(data["model"]), int(data["version"]), int(data["base_version"]), str(data["base_revision"]),
            str(data["format"]), int(data["created_ms"]), tensors, tuple(data.get("published", ())),
            int(data.get("bytes_published", 0)),
        )  # fmt: skip


@dataclass
class Upload:
    """An upload in progress: what it declared, on which base, and where its parts are."""

    upload_id: str
    model: str
    base_version: int
    base_revision: str
    format: str
    declared: list[Declared]
    folder: Path
    committed_version: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def part(self, index: int) -> Path:
        return self.folder / f"{index}.part"

    def done(self, index: int) -> Path:
        return self.folder / f"{index}.sha256"

    def received(self) -> list[int]:
        """Verified bytes of each declared tensor."""
        return [self.received_of(index) for index in range(len(self.declared))]

    def received_of(self, index: int) -> int:
        """Verified bytes of declared tensor `index`."""
        if self.done(index).is_file():
            return self.declared[index].nbytes
        part = self.part(index)
        return part.stat().st_size if part.is_file() else 0


def model_key(model: str) -> str:
    """A directory name for a model: readable, and unique by a hash of the canonical name."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", model)[-48:].strip("._") or "model"
    return f"{readable}-{hashlib.sha256(model.encode()).hexdigest()[:16]}"


class VersionStore:
    """Versions and uploads of every model, under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._versions: dict[str, dict[int, Version]] = {}
        self._uploads: dict[str, Upload] = {}
        self._committed: collections.OrderedDict[str, tuple[str, int]] = collections.OrderedDict()
        """Recently committed uploads: (model, version), so a client that lost the answer learns it."""

    # ------------------------------------------------------------------ versions

    def versions(self, model: str) -> list[Version]:
        """The model's published versions (not version 0), oldest first."""
        return [v for _, v in sorted(self._loaded(model).items())]

    def latest(self, model: str) -> int:
        """The newest version number (0 when nothing was published)."""
        found = self._loaded(model)
        return max(found) if found else 0

    def get(self, model: str, version: int) -> Version | None:
        """A published version (None for 0, the checkpoint itself).

        Raises:
            PreconditionError: no such version (never published, or dropped by retention).
        """
        if version == 0:
            return None
        found = self._loaded(model).get(version)
        if found is None:
            have = sorted(self._loaded(model))
            raise PreconditionError(
                f"model {model!r} has no version {version} (versions: 0{''.join(f', {v}' for v in have[-8:])}); "
                "it was never published or retention dropped it"
            )
        return found

    def blob_path(self, model: str, blob: str) -> Path:
        return self._model_dir(model) / "blobs" / blob

    def _model_dir(self, model: str) -> Path:
        return self.root / model_key(model)

    def _loaded(self, model: str) -> dict[int, Version]:
        with self._lock:
            found = self._versions.get(model)
            if found is None:
                found = self._versions[model] = self._read_versions(model)
            return found

    def _read_versions(self, model: str) -> dict[int, Version]:
        folder = self._model_dir(model)
        found: dict[int, Version] = {}
        if not folder.is_dir():
            return found
        for path in folder.iterdir():
            match = _VERSION_FILE.match(path.name)
            if match is None:
                continue
            try:
                version = Version.from_json(path.read_text())
            except (OSError, ValueError, KeyError, TypeError) as e:
                logger.error("ignoring version file %s: %s", path, e)
                continue
            if version.model == model and version.version == int(match.group(1)):
                found[version.version] = version
        return found

    # ------------------------------------------------------------------- uploads

    def start(self, model: str, base_version: int, base_revision: str, fmt: str, declared: list[Declared]) -> Upload:
        """Open an upload (its declaration written at once, so it survives a restart)."""
        upload_id = secrets.token_hex(16)
        folder = self._model_dir(model) / "uploads" / upload_id
        upload = Upload(upload_id, model, base_version, base_revision, fmt, declared, folder)
        folder.mkdir(parents=True)
        state = {
            "model": model, "base_version": base_version, "base_revision": base_revision, "format": fmt,
            "declared": [asdict(d) for d in declared],
        }  # fmt: skip
        atomic_write(upload.folder / "upload.json", lambda p: p.write_text(json.dumps(state)))
        self._uploads[upload.upload_id] = upload
        return upload

    def upload(self, upload_id: str) -> Upload:
        """An open upload, found on disk after a restart.

        Raises:
            UploadNotFoundError: no such upload.
        """
        found = self._uploads.get(upload_id)
        if found is not None:
            return found
        if _UPLOAD_ID.match(upload_id):
            for state in self.root.glob(f"*/uploads/{upload_id}/upload.json"):
                data = json.loads(state.read_text())
                declared = [
                    Declared(d["name"], d["dtype"], tuple(d["shape"]), int(d["nbytes"])) for d in data["declared"]
                ]
                found = Upload(upload_id, data["model"], int(data["base_version"]), data["base_revision"],
                               data["format"], declared, state.parent)  # fmt: skip
                self._uploads[upload_id] = found
                return found
        raise UploadNotFoundError(f"no upload {upload_id[:40]!r} (committed uploads are gone; start another)")

    def write(self, upload: Upload, index: int, offset: int, data: memoryview, crc: int) -> None:
        """Append one verified chunk to tensor `index` of an upload.

        Raises:
            InvalidRequestError: no such tensor, or the chunk is not where the tensor's
                part ends (GetPublish says where to go on from), or past its size.
            IntegrityError: the chunk fails its crc32c.
        """
        with upload.lock:
            tensor = self._declared(upload, index)
            if wire.crc32c(data) != crc:
                raise IntegrityError(f"{tensor.name}: chunk at byte {offset} failed its crc32c; send it again")
            have = upload.received_of(index)
            if offset != have:
                raise InvalidRequestError(
                    f"{tensor.name}: chunk at byte {offset}, but {have} bytes are in: resume there"
                )
            if offset + len(data) > tensor.nbytes:
                raise InvalidRequestError(f"{tensor.name}: bytes past its declared {tensor.nbytes}")
            with open(upload.part(index), "ab") as f:
                f.write(data)

    def finish_tensor(self, upload: Upload, index: int, tensor_crc: int) -> None:
        """Check a complete tensor's crc32c and keep its bytes as a blob named by their SHA-256.

        Raises:
            IntegrityError: the whole tensor fails its crc32c (its part is discarded).
            InvalidRequestError: the tensor is not complete.
        """
        with upload.lock:
            tensor = self._declared(upload, index)
            if upload.done(index).is_file():
                return
            part = upload.part(index)
            size = part.stat().st_size if part.is_file() else 0
            if size != tensor.nbytes:
                raise InvalidRequestError(f"{tensor.name}: {size} of its {tensor.nbytes} bytes are in")
            sha, crc = _digests(part)
            if crc != tensor_crc:
                part.unlink()
                raise IntegrityError(f"{tensor.name}: the whole tensor failed its crc32c; send it again from byte 0")
            blob = self.blob_path(upload.model, sha)
            blob.parent.mkdir(parents=True, exist_ok=True)
            if blob.exists():
                part.unlink()
            else:  # on disk before any version can name it
                fsync_path(part)
                os.replace(part, blob)
                fsync_dir(blob.parent)
            atomic_write(upload.done(index), lambda p: p.write_text(f"{sha} {crc}"))

    def commit(self, upload: Upload, base: Version | None, created_ms: int | None = None) -> Version:
        """Make the upload a version: the next number, visible at once and whole.

        Raises:
            InvalidRequestError: a declared tensor is not complete.
        """
        with upload.lock:
            if upload.committed_version:
                return self.get(upload.model, upload.committed_version)  # type: ignore[return-value]
            digests: dict[str, tuple[str, int]] = {}
            for index, tensor in enumerate(upload.declared):
                if not upload.done(index).is_file():
                    raise InvalidRequestError(f"{tensor.name} is not complete: the upload cannot be committed yet")
                sha, crc_text = upload.done(index).read_text().split()
                digests[tensor.name] = (sha, int(crc_text))
            tensors = dict(base.tensors) if base is not None else {}
            for tensor in upload.declared:
                blob, crc = digests[tensor.name]
                tensors[tensor.name] = StoredTensor(tensor.dtype, tensor.shape, tensor.nbytes, blob, crc)
            with self._lock:  # numbering is serialised: concurrent commits get consecutive numbers
                found = self._versions.setdefault(upload.model, self._read_versions(upload.model))
                number = max(found, default=0) + 1
                version = Version(
                    upload.model, number, upload.base_version, upload.base_revision, upload.format,
                    created_ms if created_ms is not None else int(time.time() * 1000), tensors,
                    tuple(t.name for t in upload.declared), sum(t.nbytes for t in upload.declared),
                )  # fmt: skip
                path = self._model_dir(upload.model) / f"v{number}.json"
                atomic_write(path, lambda p: p.write_text(version.to_json()))
                found[number] = version
            upload.committed_version = number
        shutil.rmtree(upload.folder, ignore_errors=True)
        self._uploads.pop(upload.upload_id, None)
        self._committed[upload.upload_id] = (upload.model, number)
        while len(self._committed) > MAX_COMMITTED_KEPT:
            self._committed.popitem(last=False)
        return version

    def committed(self, upload_id: str) -> tuple[str, int] | None:
        """(model, version) of an upload committed recently by this process, else None."""
        return self._committed.get(upload_id)

    def _declared(self, upload: Upload, index: int) -> Declared:
        if not 0 <= index < len(upload.declared):
            raise InvalidRequestError(f"tensor_index {index} is not one of the upload's {len(upload.declared)}")
        return upload.declared[index]

    # ----------------------------------------------------------------- retention

    def retain(self, model: str, keep: int, leased: Iterable[int]) -> list[int]:
        """Drop versions beyond the newest `keep`, never a leased one nor the newest; delete unused blobs.

        Returns the versions dropped.
        """
        with self._lock:
            found = self._versions.setdefault(model, self._read_versions(model))
            numbers = sorted(found)
            if keep <= 0 or len(numbers) <= keep:
                return []
            held = set(leased) | {numbers[-1]}
            dropped = [n for n in numbers[:-keep] if n not in held]
            for number in dropped:
                (self._model_dir(model) / f"v{number}.json").unlink(missing_ok=True)
                del found[number]
            live = {t.blob for v in found.values() for t in v.tensors.values()}
            live |= {done.read_text().split()[0] for done in self._model_dir(model).glob("uploads/*/*.sha256")}
        blobs = self._model_dir(model) / "blobs"
        if dropped and blobs.is_dir():
            for blob in blobs.iterdir():
                if blob.name not in live and not blob.name.startswith("."):
                    blob.unlink(missing_ok=True)
        return dropped


def _digests(path: Path) -> tuple[str, int]:
    """SHA-256 (hex) and crc32c of a file, in one pass."""
    sha = hashlib.sha256()
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            sha.update(block)
            crc = wire.crc32c(memoryview(block), crc)
    return sha.hexdigest(), crc
