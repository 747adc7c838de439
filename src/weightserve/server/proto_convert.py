"""Protobuf <-> domain objects, so servicers stay a few lines each."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from weightserve import wire
from weightserve.cache.manifests import Manifest
from weightserve.errors import InvalidRequestError
from weightserve.server import manifest_pages as pages
from weightserve.server import request_limits as limits
from weightserve.server.call_context import current_call
from weightserve.server.data_plane import ModelSummary, ResumeFrom
from weightserve.server.file_stream import FilePiece
from weightserve.server.stream_gate import peer_key
from weightserve.sharding.spec import ShardSpec
from weightserve.state.version_store import Declared, Upload
from weightserve.storage.base import canonical_name
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.wire import WIRE_VERSION

if TYPE_CHECKING:
    from weightserve.server.segment_plane import RunAt, SegmentGrant
    from weightserve.server.versions import VersionSummary

_LAYOUTS: dict[int, str] = {
    pb.LAYOUT_UNSPECIFIED: "checkpoint",
    pb.LAYOUT_CHECKPOINT: "checkpoint",
    pb.LAYOUT_VLLM: "vllm",
}


def layout_name(layout: int) -> str:
    """The domain name of a Layout enum value (unknown values are rejected by ShardSpec)."""
    return _LAYOUTS.get(int(layout), f"layout-{layout}")


def model_name(text: str) -> str:
    """A request's model name, within its limits, in its one canonical spelling (storage.base.canonical_name).

    The name is also noted on the current call, for its access log line.
    """
    return current_call().note_model(canonical_name(limits.check_model_name(text)))


def shard_spec(shard: pb.ShardSpec) -> ShardSpec:
    """A validated ShardSpec; zero sizes mean 1 (ep_size 0 means no expert parallelism)."""
    spec = ShardSpec(
        model=model_name(shard.model),
        revision=limits.check_text("revision", shard.revision, limits.MAX_REVISION_BYTES),
        format=limits.check_text("format", shard.format, limits.MAX_FORMAT_BYTES),
        rank=shard.rank,
        world_size=shard.world_size or 1,
        pp_rank=shard.pp_rank,
        pp_size=shard.pp_size or 1,
        ep_rank=shard.ep_rank,
        ep_size=shard.ep_size,
        layout=layout_name(shard.layout),
        num_redundant_experts=shard.num_redundant_experts,
        since_mapping=shard.since_mapping if shard.HasField("since_mapping") else None,
        version=shard.version if shard.HasField("version") else None,
        since_version=shard.since_version if shard.HasField("since_version") else None,
    )
    return current_call().note_spec(spec)


def resume_from(request: pb.FetchShardRequest) -> ResumeFrom | None:
    """The request's resume point, if it has one."""
    if not request.HasField("resume_from"):
        return None
    tensor = limits.check_text("resume tensor name", request.resume_from.tensor, limits.MAX_TENSOR_NAME_BYTES)
    return ResumeFrom(tensor, request.resume_from.offset)


_TRANSPORTS = frozenset({pb.TRANSPORT_UNSPECIFIED, pb.TRANSPORT_GRPC_CHUNKS, pb.TRANSPORT_GRPC_PACKED})


def fetch_names(request: pb.FetchShardRequest) -> list[str]:
    """The tensors a FetchShard asks for (all when empty), after the request's static checks.

    Raises:
        InvalidRequestError: too many or too long names, or a transport this server does not speak.
    """
    if request.transport == pb.TRANSPORT_SHARED_MEMORY:
        raise InvalidRequestError("TRANSPORT_SHARED_MEMORY is FetchShardSegments' to serve; FetchShard streams chunks")
    if request.transport not in _TRANSPORTS:
        raise InvalidRequestError(
            f"transport {request.transport} is not one this server speaks "
            f"({', '.join(pb.Transport.Name(t) for t in sorted(_TRANSPORTS))})"
        )
    limits.check_text("manifest id", request.manifest_id, limits.MAX_REVISION_BYTES)
    return limits.check_names(request.names)


def segment_names(request: pb.FetchShardSegmentsRequest) -> list[str]:
    """The tensors a FetchShardSegments asks for (all when empty), after the request's static checks."""
    limits.check_text("manifest id", request.manifest_id, limits.MAX_REVISION_BYTES)
    return limits.check_names(request.names)


def shard_segments(grant: SegmentGrant, runs: bool) -> bytes:
    """A serialized ShardSegments; the placements (as runs, when asked) are encoded once per layout and spliced in."""
    layout = grant.layout
    if runs:
        if layout.encoded_runs is None:
            layout.encoded_runs = pb.ShardSegments(runs=[_placement_run(run) for run in grant.runs]).SerializeToString()
        placements = layout.encoded_runs
    else:
        if layout.encoded is None:
            layout.encoded = pb.ShardSegments(
                tensors=[
                    pb.TensorPlacement(tensor_index=t.index, segment=t.segment, offset=t.offset, crc32c=t.crc32c)
                    for t in grant.tensors
                ]
            ).SerializeToString()
        placements = layout.encoded
    head = pb.ShardSegments(
        manifest_id=grant.manifest_id,
        segments=[pb.SegmentInfo(size=size) for size in grant.sizes],
        ticket=grant.ticket,
        handoff_socket=grant.socket,
        ticket_ttl_ms=grant.ticket_ms,
    )
    return bytes(head.SerializeToString()) + placements


def _placement_run(run: RunAt) -> pb.PlacementRun:
    return pb.PlacementRun(
        segment=run.segment,
        offset=run.offset,
        dtype=run.dtype,
        shape=run.shape,
        nbytes=run.nbytes,
        tensor_index=[t.index for t in run.tensors],
        crc32c=[t.crc32c for t in run.tensors],
    )


def file_patterns(request: pb.FetchFilesRequest) -> list[str]:
    """FetchFiles' patterns after their static checks (and its revision's)."""
    limits.check_text("revision", request.revision, limits.MAX_REVISION_BYTES)
    return limits.check_patterns(request.patterns)


def manifest_response(manifest: Manifest, page: pages.PageRequest | None = None) -> bytes:
    """One page of a plan (the whole plan when `page` is None or unpaged), serialized; see manifest_pages.

    The tensor list is encoded once per manifest and spliced in behind the other fields
    (protobuf appends repeated fields it meets apart): building a TensorInfo message per
    tensor per request cost about 4 us each, 40 ms for a plan of 10,000 tensors.

    Raises:
        PreconditionError: unpaged over 4 MiB, or a page token of another manifest.
        InvalidRequestError: a page token past the plan's end.
    """
    page = page or pages.PageRequest()
    plans = manifest.tensors
    start = page.start_in(manifest.manifest_id, len(plans))
    experts = None
    if manifest.experts is not None:
        slots = manifest.experts
        experts = pb.ExpertPlacement(
            mapping_version=slots.version,
            layers=[
                pb.LayerSlots(layer=layer, physical_slots=physical, logical_experts=logical, sent_slots=send)
                for layer, physical, logical, send in zip(
                    slots.layers, slots.physical, slots.logical, slots.send, strict=True
                )
            ],
        )
    response = pb.GetManifestResponse(
        experts=experts,
        manifest_id=manifest.manifest_id,
        revision=manifest.revision,
        format=manifest.format,
        total_bytes=manifest.total_bytes,
        wire_version=WIRE_VERSION,
        max_chunk_bytes=manifest.chunk_bytes,
        version=manifest.version,
    )
    end, tensors = _page_of(manifest, page, start, response.ByteSize())
    if end < len(plans):
        response.next_page_token = pages.encode_token(manifest.manifest_id, end)
    return bytes(response.SerializeToString()) + tensors


def _page_of(manifest: Manifest, page: pages.PageRequest, start: int, fixed_bytes: int) -> tuple[int, bytes]:
    """Where the page from `start` ends, and its tensors as the encoded `tensors` field.

    Kept per (start, page size) until a stream adds a digest (digests are only ever added).
    """
    key = f"page:{start}:{page.size}"
    kept = manifest.memo.get(key)
    if isinstance(kept, tuple) and kept[0] == len(manifest.digests):
        return kept[1], kept[2]
    plans, digests = manifest.tensors, manifest.digests
    known = len(digests)
    infos = _tensor_infos(manifest)
    longest_token = len(pages.encode_token(manifest.manifest_id, len(plans)))
    sizes = (len(infos[i]) + (5 if i in digests else 0) for i in range(start, len(plans)))
    what = f"the manifest of {manifest.manifest_id} ({len(plans)} tensors)"
    end = start + pages.fitting(page, sizes, fixed_bytes + 2 + longest_token, what)
    encoded = wire.encode_repeated(
        _TENSORS_FIELD, (wire.with_crc32c(infos[i], digests.get(i)) for i in range(start, end))
    )
    manifest.memo[key] = (known, end, encoded)
    return end, encoded


_TENSORS_FIELD = pb.GetManifestResponse.DESCRIPTOR.fields_by_name["tensors"].number


def _tensor_infos(manifest: Manifest) -> list[bytes]:
    """Each tensor's TensorInfo without its digest, encoded once per manifest."""
    infos = manifest.memo.get("tensor_infos")
    if infos is None:
        infos = manifest.memo["tensor_infos"] = [
            wire.encode_tensor_header(p.name, p.dtype, p.shape, p.nbytes) for p in manifest.tensors
        ]
    assert isinstance(infos, list)
    return infos


_CACHE_STATES = {
    "cold": pb.CACHE_STATE_COLD,
    "loading": pb.CACHE_STATE_LOADING,
    "warming": pb.CACHE_STATE_WARMING,
    "ready": pb.CACHE_STATE_READY,
}


def model_info(summary: ModelSummary) -> pb.ModelInfo:
    cache = summary.cache
    return pb.ModelInfo(
        name=summary.name,
        revision=summary.revision,
        format=summary.format,
        total_bytes=summary.total_bytes,
        formats=summary.formats,
        cache=pb.CacheStatus(
            state=_CACHE_STATES[cache.state],
            resident_bytes=cache.resident_bytes,
            pinned_streams=cache.pinned_streams,
            last_used_unix=cache.last_used,
            load_source=cache.load_source,
            load_files=cache.load_files,
            load_bytes=cache.load_bytes,
            load_seconds=cache.load_seconds,
        ),
    )


def file_chunk(piece: FilePiece) -> pb.FileChunk:
    return pb.FileChunk(
        path=piece.path,
        offset=piece.offset,
        size=piece.size,
        crc32c=piece.crc,
        last=piece.last,
        file_crc32c=piece.file_crc,
        data=piece.data,
    )


def peer_of(context: Any) -> str:
    """The per-peer limit's key for a call (see stream_gate.peer_key)."""
    return peer_key(context.peer(), context.invocation_metadata())


def declared_tensors(request: pb.StartPublishRequest) -> list[Declared]:
    """The tensors an upload declares, after their static checks."""
    limits.check_names([t.name for t in request.tensors][: limits.MAX_NAMES + 1])
    return [Declared(t.name, t.dtype, tuple(int(d) for d in t.shape), t.nbytes) for t in request.tensors]


def publish_status(upload: Upload, version: int = 0) -> pb.PublishStatus:
    return pb.PublishStatus(
        upload_id=upload.upload_id,
        model=upload.model,
        received=upload.received(),
        committed=bool(version),
        version=version,
        base_version=upload.base_version,
    )


def version_info(summary: VersionSummary) -> pb.VersionInfo:
    return pb.VersionInfo(
        model=summary.model,
        version=summary.version,
        base_version=summary.base_version,
        created_unix_ms=summary.created_ms,
        tensors_published=summary.tensors_published,
        bytes_published=summary.bytes_published,
        leases=summary.leases,
    )
