"""The server's data plane: manifests, shard streams, prefetch and evict.

Transport-free: it takes domain objects and yields encoded chunk bytes, so it is
tested without a network. The servicers translate protobuf to and from these calls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass

from weightserve import wire
from weightserve.config import ServerConfig
from weightserve.errors import InvalidRequestError, PreconditionError, TensorNotFoundError
from weightserve.loaders.sources import FileSource
from weightserve.server.files import FilePiece, stream_files
from weightserve.server.store import ModelStore, OpenModel, available_formats, model_files
from weightserve.server.streaming import ChunkEncoder, chunk_jobs, stream_chunks
from weightserve.sharding.plan import TensorPlan, plan_shard
from weightserve.sharding.rules import RuleSet, load_rules
from weightserve.sharding.spec import ShardSpec

logger = logging.getLogger(__name__)

MAX_NAME_BYTES = 4096
"""Longest tensor name served; keeps every chunk's framing far below 16 KiB."""


@dataclass(frozen=True)
class Manifest:
    """One rank's plan, as GetManifest reports it."""

    manifest_id: str
    revision: str
    format: str
    tensors: list[TensorPlan]
    digests: list[int | None]
    chunk_bytes: int

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class ModelSummary:
    """One line of ListModels."""

    name: str
    revision: str
    format: str
    total_bytes: int
    formats: list[str]


@dataclass(frozen=True)
class ResumeFrom:
    """Where a broken stream left off: the first incomplete tensor and its verified bytes."""

    tensor: str
    offset: int


class DataPlane:
    """What the WeightService RPCs do, minus gRPC."""

    def __init__(self, config: ServerConfig, store: ModelStore, executor: Executor) -> None:
        self.config = config
        self.store = store
        self.executor = executor
        self.rules = load_rules(config.sharding_rules) if config.sharding_rules else RuleSet()

    async def list_models(self) -> list[ModelSummary]:
        """Every servable model with its default format and revision."""
        return await asyncio.to_thread(self._list_models)

    def _list_models(self) -> list[ModelSummary]:
        summaries = []
        for name, model_dir in self.store.roots.list_models().items():
            formats = available_formats(model_dir)
            if not formats:
                continue
            found = model_files(model_dir, formats[0])
            summaries.append(ModelSummary(name, found.revision, found.format, found.total_bytes, formats))
        return summaries

    async def manifest(self, spec: ShardSpec) -> Manifest:
        """The plan `spec` resolves to now."""
        async with self.store.use(spec.model, spec.format, spec.revision) as model:
            return self._manifest(model, spec)

    def _manifest(self, model: OpenModel, spec: ShardSpec) -> Manifest:
        mid = wire.manifest_id(model.revision, {**spec.plan_params(), "format": model.format})
        plans = model.plans.get(mid)
        if plans is None:
            loader = model.loader
            plans = plan_shard(loader.records, spec, model.model_config, self.rules, loader.saved_shards)
            for plan in plans:
                if len(plan.name.encode()) > MAX_NAME_BYTES:
                    raise InvalidRequestError(f"tensor name of {len(plan.name)} characters is too long to serve")
            model.plans[mid] = plans
        digests = [model.digests.get((mid, p.name)) for p in plans]
        return Manifest(mid, model.revision, model.format, plans, digests, self.config.chunk_bytes)

    async def fetch(
        self,
        spec: ShardSpec,
        names: list[str] | None = None,
        manifest_id: str = "",
        resume: ResumeFrom | None = None,
    ) -> AsyncIterator[bytes]:
        """Encoded TensorChunk messages for the rank's tensors (docs/wire.md).

        Raises:
            PreconditionError: `manifest_id` no longer matches the model.
            TensorNotFoundError: a name (or the resume tensor) is not in the plan.
            InvalidRequestError: a resume point without a manifest id, or past the tensor.
            CorruptCheckpointError: a file was truncated or changed while read.
        """
        async with self.store.use(spec.model, spec.format, spec.revision) as model:
            manifest = self._manifest(model, spec)
            if manifest_id and manifest_id != manifest.manifest_id:
                raise PreconditionError(
                    f"manifest {manifest_id} no longer matches model {spec.model!r} "
                    f"(now revision {model.revision}, manifest {manifest.manifest_id}); fetch the manifest again"
                )
            selection, start = self._selection(manifest, names, manifest_id, resume)
            encoder = ChunkEncoder(
                manifest.tensors, {i: d for i, d in enumerate(manifest.digests) if d is not None}
            )
            started, sent = time.perf_counter(), 0
            jobs = chunk_jobs(manifest.tensors, selection, start, self.config.chunk_bytes)
            try:
                async for message in stream_chunks(
                    manifest.tensors,
                    model.loader.sources,
                    jobs,
                    encoder,
                    self.executor,
                    chunk_bytes=self.config.chunk_bytes,
                    read_ahead=self.config.read_ahead,
                ):
                    sent += len(message)
                    yield message
            finally:
                for index, digest in encoder.finished.items():
                    model.digests[(manifest.manifest_id, manifest.tensors[index].name)] = digest
            seconds = time.perf_counter() - started
            logger.info(
                "sent %s rank %d/%d: %d tensors, %d bytes in %.2fs (%.2f GB/s)",
                spec.model, spec.rank, spec.world_size, len(selection), sent, seconds, sent / max(seconds, 1e-9) / 1e9,
            )

    @staticmethod
    def _selection(
        manifest: Manifest, names: list[str] | None, manifest_id: str, resume: ResumeFrom | None
    ) -> tuple[list[int], int]:
        position = {t.name: i for i, t in enumerate(manifest.tensors)}
        if names:
            missing = [n for n in names if n not in position]
            if missing:
                raise TensorNotFoundError(f"no tensor {missing[0]!r} in this plan ({len(missing)} unknown names)")
            wanted = set(names)
            selection = [i for i, t in enumerate(manifest.tensors) if t.name in wanted]
        else:
            selection = list(range(len(manifest.tensors)))
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

    async def prefetch(self, spec: ShardSpec, ranks: list[int]) -> tuple[str, int]:
        """Open the model and ask the kernel to read the given ranks' byte ranges.

        Returns:
            The revision and the number of bytes being warmed; the reads go on in the
            background.
        """
        async with self.store.use(spec.model, spec.format, spec.revision) as model:
            total = 0
            ranges: set[tuple[int, int, int]] = set()
            for rank in ranks or range(spec.world_size):
                rank_spec = ShardSpec(**{**spec.plan_params(), "rank": rank, "revision": spec.revision})
                for plan in self._manifest(model, rank_spec).tensors:
                    for piece in plan.pieces:
                        if piece.source >= 0:
                            span = piece.stride * (piece.rows - 1) + piece.row_bytes
                            ranges.add((piece.source, piece.offset, span))
                            total += piece.nbytes
            sources = model.loader.sources
            for source_index, offset, span in sorted(ranges):
                source = sources[source_index]
                if isinstance(source, FileSource):
                    source.advise_willneed(offset, span)
            return model.revision, total

    async def files(self, model: str, revision: str, patterns: list[str] | None) -> AsyncIterator[FilePiece]:
        """The model's non-weight files (config, tokenizer), chunked with checksums."""
        model_dir = await asyncio.to_thread(self.store.roots.resolve, model)
        if revision:
            found = await asyncio.to_thread(model_files, model_dir)
            if found.revision != revision:
                raise PreconditionError(f"model {model!r} is at revision {found.revision}, not the pinned {revision}")
        async for piece in stream_files(model_dir, patterns, self.config.chunk_bytes):
            yield piece

    def evict(self, name: str) -> bool:
        """Drop the model's open copies."""
        return self.store.evict(name)
