"""The server's data plane: manifests, shard streams, file streams, prefetch, evict.

Transport-free: it takes domain objects and yields encoded chunk bytes, so it is
tested without a network. The servicers translate protobuf to and from these calls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from dataclasses import dataclass

from weightserve import wire
from weightserve.cache.entry import ModelEntry
from weightserve.cache.manifests import Manifest
from weightserve.cache.model_cache import CacheStatus, ModelCache
from weightserve.config import ServerConfig
from weightserve.errors import InvalidRequestError, PreconditionError, TensorNotFoundError, WeightserveError
from weightserve.loaders.formats import files_at, formats_at
from weightserve.server.call_context import current_call
from weightserve.server.chunk_stream import ChunkFramer, chunk_jobs, packed_jobs, stream_chunks
from weightserve.server.control_plane import ControlPlane
from weightserve.server.deltas import plan_delta
from weightserve.server.file_stream import FilePiece, select_files, stream_files
from weightserve.server.prefetch import Warmer
from weightserve.server.versions import Versions
from weightserve.sharding.plan import plan_shard
from weightserve.sharding.rules import RuleSet, load_rules
from weightserve.sharding.spec import ShardSpec
from weightserve.storage.base import parse_remote

logger = logging.getLogger(__name__)

MAX_NAME_BYTES = 4096
"""Longest tensor name served; keeps every chunk's framing far below 16 KiB."""


@dataclass(frozen=True)
class ModelSummary:
    """One line of ListModels."""

    name: str
    revision: str
    format: str
    total_bytes: int
    formats: list[str]
    cache: CacheStatus


@dataclass(frozen=True)
class ResumeFrom:
    """Where a broken stream left off: the first incomplete tensor and its verified bytes."""

    tensor: str
    offset: int


class DataPlane:
    """What the WeightService RPCs do, minus gRPC."""

    def __init__(
        self,
        config: ServerConfig,
        cache: ModelCache,
        executor: Executor,
        control: ControlPlane,
        versions: Versions | None = None,
    ) -> None:
        self.config = config
        self.cache = cache
        self.executor = executor
        self.control = control
        self.versions = versions or Versions(cache, None)
        self.warmer = Warmer(cache, executor, config, self.plan, self.versions.resolve)
        self.rules = load_rules(config.sharding_rules) if config.sharding_rules else RuleSet()

    async def list_models(self) -> list[ModelSummary]:
        """Every local model, plus remote ones the cache holds, with cache state."""
        listed = await asyncio.to_thread(self._list_local)
        names = {s.name for s in listed}
        for entry in self.cache.open_entries():
            if entry.name not in names:
                names.add(entry.name)
                listed.append(
                    ModelSummary(
                        entry.name,
                        entry.revision,
                        entry.format,
                        entry.load.bytes,
                        [entry.format],
                        CacheStatus("cold"),
                    )
                )
        return [
            ModelSummary(s.name, s.revision, s.format, s.total_bytes, s.formats, self.cache.status(s.name))
            for s in sorted(listed, key=lambda s: s.name)
        ]

    def _list_local(self) -> list[ModelSummary]:
        summaries = []
        for name, location in self.cache.local_models().items():
            try:
                formats = formats_at(location)
                if not formats:
                    continue
                found = files_at(location, formats[0])
            except WeightserveError as e:  # one broken directory must not hide the others
                logger.warning("not listing %s: %s", name, e)
                continue
            summaries.append(
                ModelSummary(name, found.revision, found.format, found.total_bytes, formats, CacheStatus("cold"))
            )
        return summaries

    @asynccontextmanager
    async def use(self, spec: ShardSpec) -> AsyncIterator[tuple[ModelEntry, ShardSpec]]:
        """Pin the entry that serves `spec` (the version it names, or the latest) for the block.

        Yields the entry and the spec with its version made explicit.
        """
        resolved, variant = await self.versions.resolve(spec)
        async with self.cache.use(spec.model, spec.format, spec.revision, variant) as entry:
            yield entry, resolved

    async def manifest(self, spec: ShardSpec) -> Manifest:
        """The plan `spec` resolves to now."""
        async with self.use(spec) as (entry, resolved):
            return await self.plan_for(entry, resolved)

    async def plan_for(self, entry: ModelEntry, spec: ShardSpec) -> Manifest:
        """The plan, or with `since_version` only its tensors that changed since then (see deltas.py)."""
        if spec.since_version is None:
            return self.plan(entry, spec)
        return await plan_delta(self, entry, spec)

    def plan(self, entry: ModelEntry, spec: ShardSpec) -> Manifest:
        """The entry's plan for `spec`, computed once per manifest id."""
        params = {**spec.plan_params(), "format": entry.format}
        slots = None
        if spec.ep_size:
            layout = entry.moe_layout()
            if layout is None:
                raise InvalidRequestError(f"model {spec.model!r} has no experts to spread over ep_size {spec.ep_size}")
            slots = self.control.slots(spec, layout)
            params["mapping_version"] = slots.version
            params["expert_slots"] = slots.fingerprint()
        mid = wire.manifest_id(entry.revision, params)

        def build() -> Manifest:
            loader = entry.loader
            plans = plan_shard(loader.records, spec, entry.model_config, self.rules, loader.sharded_state, slots)
            for plan in plans:
                if len(plan.name.encode()) > MAX_NAME_BYTES:
                    raise InvalidRequestError(f"tensor name of {len(plan.name)} characters is too long to serve")
            recorded = loader.sharded_state.digests.get(spec.rank, {}) if loader.sharded_state else {}
            digests = {i: recorded[p.name] for i, p in enumerate(plans) if p.name in recorded}
            return Manifest(
                mid, entry.revision, entry.format, plans, self.config.chunk_bytes, slots, digests, spec.version or 0
            )

        return entry.manifests.get_or_build(mid, build)

    async def fetch(
        self,
        spec: ShardSpec,
        names: list[str] | None = None,
        manifest_id: str = "",
        resume: ResumeFrom | None = None,
        packed: bool = False,
    ) -> AsyncIterator[bytes]:
        """Encoded TensorChunk messages for the rank's tensors (docs/wire.md); `packed`:
        small whole tensors several to a message (TRANSPORT_GRPC_PACKED).

        Raises:
            PreconditionError: `manifest_id` no longer matches the model.
            TensorNotFoundError: a name (or the resume tensor) is not in the plan.
            InvalidRequestError: a resume point without a manifest id, or past the tensor.
            CorruptCheckpointError: a file was truncated or changed while read.
            ResourceExhaustedError: the memory budget has no room for the stream's window.
        """
        started = time.perf_counter()  # time to first chunk counts opening the model, as a caller waits for it
        async with self.use(spec) as (entry, resolved):
            spec = resolved  # the version made explicit
            manifest = await self.plan_for(entry, spec)
            if manifest_id and manifest_id != manifest.manifest_id:
                raise PreconditionError(
                    f"manifest {manifest_id} no longer matches model {spec.model!r} "
                    f"(now revision {entry.revision}, manifest {manifest.manifest_id}); "
                    "fetch the manifest again"
                )
            selection, start = _selection(manifest, names, manifest_id, resume)
            framer = ChunkFramer(manifest.tensors, dict(manifest.digests))
            window = self.config.prefetch_depth * self.config.chunk_bytes
            sent = 0
            make_jobs = packed_jobs if packed else chunk_jobs
            jobs = make_jobs(manifest.tensors, selection, start, self.config.chunk_bytes)
            recorder = self.cache.recorder
            with self.cache.stream_window(window):
                recorder.stream_started(spec.model, spec.layout, resume is not None)
                try:
                    async for message in stream_chunks(
                        self.cache,
                        entry,
                        manifest,
                        jobs,
                        framer,
                        self.executor,
                        read_ahead=self.config.prefetch_depth,
                        in_place=self.config.in_place_messages,
                    ):
                        if not sent:
                            recorder.first_chunk(spec.model, time.perf_counter() - started)
                        sent += len(message)
                        recorder.bytes_sent(spec.model, spec.layout, len(message))
                        current_call().add_bytes(len(message))
                        yield message
                finally:
                    manifest.digests.update(framer.finished)
                    recorder.stream_finished(spec.model, spec.layout, sent, time.perf_counter() - started)
            seconds = time.perf_counter() - started
            logger.debug(
                "sent %s rank %d/%d: %d tensors, %d bytes in %.2fs (%.2f GB/s)",
                spec.model,
                spec.rank,
                spec.world_size,
                len(selection),
                sent,
                seconds,
                sent / max(seconds, 1e-9) / 1e9,
            )

    async def files(self, model: str, revision: str, patterns: list[str] | None) -> AsyncIterator[FilePiece]:
        """The model's non-weight files (config, tokenizer), chunked with checksums; never
        those of a model inside it (see select_dir_files)."""
        location = await self.cache.locate(model)
        if revision:
            found = await asyncio.to_thread(files_at, location)
            if found.revision != revision:
                raise PreconditionError(f"model {model!r} is at revision {found.revision}, not the pinned {revision}")
        chosen = await asyncio.to_thread(select_files, location, patterns)
        async for piece in stream_files(chosen, self.config.chunk_bytes):
            yield piece

    async def prefetch(self, spec: ShardSpec, ranks: list[int], wait: bool = False) -> tuple[str, int]:
        """Warm the given ranks' chunks in the background; see Warmer."""
        return await self.warmer.prefetch(spec, ranks, wait)

    async def evict(self, name: str) -> bool:
        """Drop the model's cache entries; False for a known model that had none open.

        A remote name with nothing open answers False without being resolved: resolving
        it could download the model just to learn that it is cold.

        Raises:
            ModelNotFoundError: no model has that name (a typo is not a cold model).
        """
        if self.cache.evict(name):
            return True
        if parse_remote(name) is None:
            await self.cache.locate(name)
        return False


def _selection(
    manifest: Manifest, names: list[str] | None, manifest_id: str, resume: ResumeFrom | None
) -> tuple[list[int], int]:
    """Indices of the tensors to send, in manifest order, and the first one's start offset."""
    position = {t.name: i for i, t in enumerate(manifest.tensors)}
    selection = selection_of(manifest, names)
    if resume is None:
        return selection, 0
    if not manifest_id:
        raise InvalidRequestError("resume_from needs the manifest_id the stream started with")
    index = position.get(resume.tensor)
    if index is None or index not in selection:
        raise TensorNotFoundError(f"resume tensor {resume.tensor!r} is not in this request's tensors")
    size = manifest.tensors[index].nbytes
    if resume.offset > size:
        raise InvalidRequestError(f"resume offset {resume.offset} is past tensor {resume.tensor!r} ({size} bytes)")
    return selection[selection.index(index) :], resume.offset


def selection_of(manifest: Manifest, names: list[str] | None) -> list[int]:
    """Indices of the named tensors (all without names), in manifest order.

    Raises:
        TensorNotFoundError: a name is not in the plan.
    """
    if not names:
        return list(range(len(manifest.tensors)))
    position = {t.name for t in manifest.tensors}
    missing = [n for n in names if n not in position]
    if missing:
        raise TensorNotFoundError(f"no tensor {missing[0]!r} in this plan ({len(missing)} unknown names)")
    wanted = set(names)
    return [i for i, t in enumerate(manifest.tensors) if t.name in wanted]
