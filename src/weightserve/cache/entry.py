"""One cache entry: a checkpoint revision opened for serving, and its cached chunks."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from weightserve.cache.manifests import ManifestStore
from weightserve.cache.segments import RecordIndex, Segment, SegmentKey, SegmentSet
from weightserve.loaders.base import Loader
from weightserve.loaders.sources import Source
from weightserve.sharding.experts import MoeLayout, moe_layout
from weightserve.sharding.model_config import ModelConfig

logger = logging.getLogger(__name__)

ChunkKey = tuple[str, int, int, int]
"""(manifest id, tensor index, byte offset, length)."""


@dataclass(frozen=True)
class CachedChunk:
    """A chunk's canonical TensorChunk encoding: a header iff offset 0, never `last`.

    Streams send it as it is, except a tensor's last chunk (which carries the
    whole-tensor crc) and the first chunk after a mid-tensor resume (which needs the
    header): those are re-framed around `payload`.
    """

    message: bytes
    payload_at: int
    crc: int

    @property
    def payload(self) -> memoryview:
        return memoryview(self.message)[self.payload_at :]


@dataclass(frozen=True)
class CachedPack:
    """A framed packed chunk (TRANSPORT_GRPC_PACKED) and each of its tensors' crc32c.

    `chunks` holds the canonical chunk of each tensor the pack read from its file
    (None for those it was handed), for waiting streams and the memory cache.
    """

    message: bytes
    crcs: tuple[int, ...]
    chunks: tuple[CachedChunk | None, ...]


@dataclass
class LoadStats:
    """What opening (and downloading) a model cost."""

    source: str
    files: int
    bytes: int
    seconds: float

    @property
    def throughput(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


@dataclass(eq=False)  # compared and hashed by identity: kept in sets (ModelCache.lingering)
class ModelEntry:
    """A model revision opened for serving; pinned while any stream reads it."""

    name: str
    source: str
    format: str
    revision: str
    loader: Loader
    model_config: ModelConfig
    load: LoadStats
    manifests: ManifestStore = field(default_factory=ManifestStore)
    chunks: dict[ChunkKey, CachedChunk] = field(default_factory=dict)
    inflight: dict[ChunkKey, asyncio.Future[CachedChunk]] = field(default_factory=dict)
    chunk_bytes: int = 0
    pins: int = 0
    warming: int = 0
    last_used: float = field(default_factory=time.monotonic)
    last_used_wall: float = field(default_factory=time.time)
    retired: bool = False
    moe: MoeLayout | None = None
    moe_known: bool = False
    segments: SegmentSet = field(default_factory=SegmentSet)
    """Shared-memory segments of this revision (cache/segments.py)."""
    segment_builds: dict[SegmentKey, asyncio.Task[Segment]] = field(default_factory=dict)
    _record_index: RecordIndex | None = None

    def record_index(self) -> RecordIndex:
        """The checkpoint's tensors by byte range (built once), to share segments between ranks."""
        if self._record_index is None:
            self._record_index = RecordIndex(self.loader.records)
        return self._record_index

    def moe_layout(self) -> MoeLayout | None:
        """The checkpoint's MoE layers and expert count (None for a dense model), found once."""
        if not self.moe_known:
            self.moe, self.moe_known = moe_layout(self.loader.records, self.model_config.num_experts), True
        return self.moe

    @property
    def sources(self) -> list[Source]:
        """The open checkpoint's byte sources, which tensor plans index."""
        return self.loader.sources

    @property
    def resident_bytes(self) -> int:
        """Memory the entry holds that the budget counts: cached chunks, manifests and segments."""
        return self.chunk_bytes + self.manifests.nbytes + self.segments.nbytes

    @property
    def pinned(self) -> bool:
        return self.pins > 0

    def cached_chunk(self, key: ChunkKey) -> CachedChunk | None:
        """The chunk if it is cached (the warm path takes it without a task or a thread)."""
        return self.chunks.get(key)

    def touch(self) -> None:
        self.last_used = time.monotonic()
        self.last_used_wall = time.time()

    def keep(self, key: ChunkKey, chunk: CachedChunk) -> None:
        if key not in self.chunks:
            self.chunks[key] = chunk
            self.chunk_bytes += len(chunk.message)

    def drop_chunks(self) -> int:
        """Drop cached chunks, manifests and unleased segments (all rebuilt on demand); return the bytes freed."""
        freed = self.chunk_bytes + self.manifests.nbytes
        self.chunks.clear()
        self.chunk_bytes = 0
        self.manifests.clear()
        return freed + self.segments.drop_idle()

    def close_if_unused(self) -> None:
        """Close files once retired and no stream holds the entry."""
        if self.retired and self.pins == 0:
            self.drop_chunks()
            self.loader.close()
            logger.info("closed %s (%s, %s)", self.name, self.format, self.revision)
