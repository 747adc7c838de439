"""Weight versions as the server serves them: which version a request means, uploads, leases, watchers.

Without `--state-dir` there is only version 0 (the checkpoint) and nothing can be
published. With it, a request that pins no version gets the latest; a manifest's
revision (`REV+vN.DIGEST`) pins the version it was planned for, so a resumed stream never
crosses a publish, nor moves onto a replica whose version N holds other weights. A
worker's WatchVersions stream leases the version it serves; retention (`--max-versions`)
keeps every leased version and the newest.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from weightserve import wire
from weightserve.cache.model_cache import ModelCache, Variant
from weightserve.errors import InvalidRequestError, PermissionDeniedError, PreconditionError
from weightserve.loaders.base import Loader
from weightserve.sharding.spec import ShardSpec
from weightserve.state.version_loader import VersionLoader
from weightserve.state.version_store import Declared, Upload, Version, VersionStore

logger = logging.getLogger(__name__)

MAX_DECLARED = 1_000_000
"""Most tensors one upload may declare."""

NO_STATE_DIR = "versions need a server started with --state-dir"

_VERSION_TAG = re.compile(r"v(?P<number>[0-9]{1,18})(?:\.(?P<digest>[0-9a-f]{16}))?")
"""A revision's version part: the number, and the content digest that makes it unambiguous
across replicas (absent in a revision typed by hand: then the number alone pins it)."""


@dataclass(frozen=True)
class VersionSummary:
    """One version as ListVersions and WatchVersions report it."""

    model: str
    version: int
    base_version: int
    created_ms: int
    tensors_published: int
    bytes_published: int
    leases: int


class Versions:
    """The versions of every model this server serves (a VersionStore, when there is a state dir)."""

    def __init__(self, cache: ModelCache, state_dir: Path | None, max_versions: int = 0) -> None:
        self.cache = cache
        self.store = VersionStore(state_dir / "versions") if state_dir is not None else None
        self.max_versions = max_versions
        self.leases: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
        self._published: dict[str, asyncio.Condition] = {}

    # --------------------------------------------------------------- resolving

    async def resolve(self, spec: ShardSpec) -> tuple[ShardSpec, Variant | None]:
        """The spec with its version made explicit, and the variant that serves it (None: the checkpoint).

        Raises:
            InvalidRequestError: the revision's version and `version` disagree.
            PreconditionError: no such version, or versions without a state dir.
        """
        base, _, tag = spec.revision.partition("+")
        pinned, digest = spec.version, ""
        if tag:
            named = _VERSION_TAG.fullmatch(tag)
            if named is None:
                raise InvalidRequestError(
                    f"revision {spec.revision[:80]!r}: the part after '+' names a version (vN.DIGEST)"
                )
            if pinned is not None and pinned != int(named["number"]):
                raise InvalidRequestError(
                    f"revision {spec.revision!r} is version {named['number']}, not the version {pinned} asked"
                )
            pinned, digest = int(named["number"]), named["digest"] or ""
        store = self.store
        if store is None:
            if pinned or spec.since_version is not None:
                raise PreconditionError(f"{NO_STATE_DIR}; this one serves version 0 only")
            return replace(spec, revision=base, version=None), None
        version = pinned if pinned is not None else await asyncio.to_thread(store.latest, spec.model)
        resolved = replace(spec, revision=base, version=version)
        if version == 0:
            return resolved, None
        found = await asyncio.to_thread(store.get, spec.model, version)
        assert found is not None
        if digest and digest != found.content_digest:
            raise PreconditionError(
                f"version {version} of {spec.model} here is other weights ({found.content_digest}) than the "
                f"version {version} the manifest was planned on ({digest}): fetch the manifest again"
            )
        tag = f"v{version}.{found.content_digest}"
        return resolved, Variant(tag, _wrapper(found, lambda blob: store.blob_path(spec.model, blob)))

    # --------------------------------------------------------------- publishing

    async def start(self, model: str, base_version: int | None, declared: list[Declared]) -> Upload:
        """Open an upload of the tensors `declared`, on `base_version` (None: the latest).

        Raises:
            PreconditionError: no state dir; a base that does not exist; a checkpoint
                that is not one versions can be published over (GGUF, saved shards).
            InvalidRequestError: a tensor the checkpoint lacks, or with another dtype or shape.
        """
        store = self._store()
        if not declared or len(declared) > MAX_DECLARED:
            raise InvalidRequestError(f"an upload declares 1 to {MAX_DECLARED} tensors, not {len(declared)}")
        names = [d.name for d in declared]
        if len(set(names)) != len(names):
            raise InvalidRequestError("an upload declares each tensor once")
        base = base_version if base_version is not None else await asyncio.to_thread(store.latest, model)
        if base:
            await asyncio.to_thread(store.get, model, base)
        async with self.cache.use(model) as entry:
            if entry.loader.sharded_state is not None or entry.format not in ("safetensors", "torch"):
                raise PreconditionError(
                    f"model {model!r} is served from {entry.format}: versions are published over "
                    "safetensors or torch checkpoints"
                )
            records = {r.name: r for r in entry.loader.records}
            for tensor in declared:
                record = records.get(tensor.name)
                if record is None:
                    raise InvalidRequestError(f"the checkpoint of {model!r} has no tensor {tensor.name!r}")
                if (tensor.dtype, tensor.shape) != (record.dtype, record.shape):
                    raise InvalidRequestError(
                        f"{tensor.name} is {record.dtype} {list(record.shape)} in the checkpoint, not "
                        f"{tensor.dtype} {list(tensor.shape)}: a version changes values, not shapes"
                    )
                expected = wire.DTYPE_SIZES[record.dtype] * _count(record.shape)
                if tensor.nbytes != expected:
                    raise InvalidRequestError(f"{tensor.name}: {tensor.nbytes} bytes declared, {expected} expected")
            revision, fmt = entry.revision, entry.format
        return await asyncio.to_thread(store.start, model, base, revision, fmt, declared)

    def upload(self, upload_id: str, may_read: Callable[[str], bool]) -> Upload:
        """An open upload the caller may write to.

        Raises:
            UploadNotFoundError: no such upload (or one of a model the caller may not see).
        """
        upload = self._store().upload(upload_id)
        if not may_read(upload.model):
            raise PermissionDeniedError(f"upload {upload_id[:40]!r} is not of a model your token covers")
        return upload

    def committed(self, upload_id: str, may_read: Callable[[str], bool]) -> tuple[str, int] | None:
        """(model, version) of an upload committed lately, when the caller may see the model."""
        found = self.store.committed(upload_id) if self.store is not None else None
        return found if found is not None and may_read(found[0]) else None

    async def write(
        self, upload: Upload, index: int, offset: int, data: bytes, crc: int, last: bool, tensor_crc: int
    ) -> None:
        store = self._store()
        if data:
            await asyncio.to_thread(store.write, upload, index, offset, memoryview(data), crc)
        if last:
            await asyncio.to_thread(store.finish_tensor, upload, index, tensor_crc)

    async def commit(self, upload: Upload) -> Version:
        """Make the upload the model's next version, tell the watchers, apply retention."""
        store = self._store()
        base = await asyncio.to_thread(store.get, upload.model, upload.base_version)
        version = await asyncio.to_thread(store.commit, upload, base)
        logger.info(
            "published %s version %d on version %d: %d tensors, %d bytes",
            version.model, version.version, version.base_version, len(version.published), version.bytes_published,
        )  # fmt: skip
        condition = self._condition(upload.model)
        async with condition:
            condition.notify_all()
        if self.max_versions:
            leased = [v for v, n in self.leases[upload.model].items() if n > 0]
            dropped = await asyncio.to_thread(store.retain, upload.model, self.max_versions, leased)
            if dropped:
                logger.info("dropped versions %s of %s (--max-versions %d)", dropped, upload.model, self.max_versions)
        return version

    # ------------------------------------------------------------------ listing

    async def summaries(self, model: str) -> list[VersionSummary]:
        """Every version of a model, version 0 first.

        Raises:
            ModelNotFoundError: no such model (and no versions of it stored).
        """
        found = await asyncio.to_thread(self.store.versions, model) if self.store is not None else []
        if not found:
            await self.cache.locate(model)  # a model with versions was one when they were published
        leases = self.leases.get(model, collections.Counter())
        return [VersionSummary(model, 0, 0, 0, 0, 0, leases[0])] + [self._summary(v, leases) for v in found]

    async def watch(self, model: str, after: int, serving: int | None) -> AsyncIterator[VersionSummary]:
        """Each version after `after`, as it is published; leases `serving` until the caller stops.

        Raises:
            ModelNotFoundError: no such model: a watch of a misspelt name fails, not waits forever.
        """
        await self.summaries(model)  # before any state is kept for the name
        if serving is not None:
            self.leases[model][serving] += 1
        try:
            condition = self._condition(model)
            while True:
                found = [s for s in await self.summaries(model) if s.version > after]
                for summary in found:
                    yield summary
                    after = summary.version
                async with condition:
                    if self.store is None or self.store.latest(model) <= after:
                        await condition.wait()
        finally:
            if serving is not None:
                leases = self.leases[model]
                leases[serving] -= 1
                if not +leases:  # no lease left: keep no per-model state
                    del self.leases[model]

    def _summary(self, version: Version, leases: collections.Counter[int]) -> VersionSummary:
        return VersionSummary(
            version.model, version.version, version.base_version, version.created_ms,
            len(version.published), version.bytes_published, leases[version.version],
        )  # fmt: skip

    def _condition(self, model: str) -> asyncio.Condition:
        condition = self._published.get(model)
        if condition is None:
            condition = self._published[model] = asyncio.Condition()
        return condition

    def _store(self) -> VersionStore:
        if self.store is None:
            raise PreconditionError(NO_STATE_DIR)
        return self.store


def _wrapper(version: Version, blob_path: Callable[[str], Path]) -> Callable[[Loader, str], Loader]:
    def wrap(loader: Loader, revision: str) -> Loader:
        if revision != version.base_revision:
            raise PreconditionError(
                f"version {version.version} of {version.model} was published on checkpoint revision "
                f"{version.base_revision}, and the checkpoint is now {revision}: publish it again"
            )
        return VersionLoader(loader, version, blob_path)

    return wrap


def _count(shape: tuple[int, ...]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total
