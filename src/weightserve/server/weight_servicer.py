"""WeightService servicer: proto -> domain, call the data plane, domain -> proto."""

from __future__ import annotations

import asyncio

import grpc

from weightserve.server import manifest_pages as pages
from weightserve.server import proto_convert as convert
from weightserve.server import request_limits as limits
from weightserve.server.auth import current_caller
from weightserve.server.data_plane import DataPlane
from weightserve.server.segment_plane import SegmentPlane
from weightserve.server.status_codes import call_errors
from weightserve.server.stream_gate import StreamGate
from weightserve.sharding.spec import ShardSpec
from weightserve.v1 import weightserve_pb2 as pb

PREENCODED_RESPONSES = frozenset({"FetchShard", "GetManifest", "FetchShardSegments"})
"""Methods whose handlers yield already-serialized messages (see wire.py)."""


class WeightServicer:
    """Implements weightserve.v1.WeightService over a DataPlane."""

    def __init__(self, plane: DataPlane, gate: StreamGate, segments: SegmentPlane) -> None:
        self.plane = plane
        self.gate = gate
        self.segments = segments

    @call_errors
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        caller = current_caller()
        models = [m for m in await self.plane.list_models() if caller.may_read(m.name)]
        return pb.ListModelsResponse(models=[convert.model_info(m) for m in models])

    @call_errors
    async def GetManifest(self, request: pb.GetManifestRequest, context: grpc.aio.ServicerContext) -> bytes:
        """A serialized GetManifestResponse (its tensor list is encoded once per manifest)."""
        spec, page = convert.shard_spec(request.shard), pages.page_request(request.page_size, request.page_token)
        manifest = await self.plane.manifest(spec)
        return await asyncio.to_thread(convert.manifest_response, manifest, page)  # the first encode: off the loop

    @call_errors
    async def FetchShard(self, request: pb.FetchShardRequest, context: grpc.aio.ServicerContext) -> None:
        spec, names = convert.shard_spec(request.shard), convert.fetch_names(request)
        resume = convert.resume_from(request)
        with self.gate.admit(convert.peer_of(context), current_caller()) as stream:
            packed = request.transport == pb.TRANSPORT_GRPC_PACKED
            async for message in self.plane.fetch(spec, names, request.manifest_id, resume, packed):
                await stream.write(context, message)

    @call_errors
    async def FetchShardSegments(
        self, request: pb.FetchShardSegmentsRequest, context: grpc.aio.ServicerContext
    ) -> bytes:
        """A serialized ShardSegments (its placements are encoded once per layout)."""
        spec, names = convert.shard_spec(request.shard), convert.segment_names(request)
        grant = await self.segments.grant(spec, names, request.manifest_id)
        return convert.shard_segments(grant, request.runs)

    @call_errors
    async def FetchFiles(self, request: pb.FetchFilesRequest, context: grpc.aio.ServicerContext) -> None:
        patterns = convert.file_patterns(request)
        with self.gate.admit(convert.peer_of(context), current_caller()) as stream:
            async for piece in self.plane.files(convert.model_name(request.model), request.revision, patterns):
                await stream.write(context, convert.file_chunk(piece))

    @call_errors
    async def Prefetch(self, request: pb.PrefetchRequest, context: grpc.aio.ServicerContext) -> pb.PrefetchResponse:
        spec = ShardSpec(
            model=convert.model_name(request.model),
            revision=limits.check_text("revision", request.revision, limits.MAX_REVISION_BYTES),
            format=limits.check_text("format", request.format, limits.MAX_FORMAT_BYTES),
            world_size=request.world_size or 1,
            layout=convert.layout_name(request.layout),
        )
        revision, nbytes = await self.plane.prefetch(spec, list(request.ranks), request.wait)
        return pb.PrefetchResponse(revision=revision, bytes=nbytes)

    @call_errors
    async def Evict(self, request: pb.EvictRequest, context: grpc.aio.ServicerContext) -> pb.EvictResponse:
        return pb.EvictResponse(evicted=await self.plane.evict(convert.model_name(request.model)))
