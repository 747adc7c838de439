"""WeightService servicer: proto -> domain, call the data plane, domain -> proto."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from weightserve.server import proto_convert as convert
from weightserve.server.data_plane import DataPlane
from weightserve.server.status_codes import stream_errors, unary_errors
from weightserve.sharding.spec import ShardSpec
from weightserve.v1 import weightserve_pb2 as pb

PREENCODED_RESPONSES = frozenset({"FetchShard"})
"""Methods whose handlers yield already-serialized messages (see wire.py)."""


class WeightServicer:
    """Implements weightserve.v1.WeightService over a DataPlane."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    @unary_errors
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        models = await self.plane.list_models()
        return pb.ListModelsResponse(models=[convert.model_info(m) for m in models])

    @unary_errors
    async def GetManifest(
        self, request: pb.GetManifestRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetManifestResponse:
        manifest = await self.plane.manifest(convert.shard_spec(request.shard))
        return convert.manifest_response(manifest)

    @stream_errors
    async def FetchShard(
        self, request: pb.FetchShardRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        spec = convert.shard_spec(request.shard)
        resume = convert.resume_from(request)
        async for message in self.plane.fetch(spec, list(request.names), request.manifest_id, resume):
            yield message

    @stream_errors
    async def FetchFiles(
        self, request: pb.FetchFilesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.FileChunk]:
        async for piece in self.plane.files(
            convert.model_name(request.model), request.revision, list(request.patterns)
        ):
            yield convert.file_chunk(piece)

    @unary_errors
    async def Prefetch(self, request: pb.PrefetchRequest, context: grpc.aio.ServicerContext) -> pb.PrefetchResponse:
        spec = ShardSpec(
            model=convert.model_name(request.model),
            revision=request.revision,
            format=request.format,
            world_size=request.world_size or 1,
            layout=convert.layout_name(request.layout),
        )
        revision, nbytes = await self.plane.prefetch(spec, list(request.ranks), request.wait)
        return pb.PrefetchResponse(revision=revision, bytes=nbytes)

    @unary_errors
    async def Evict(self, request: pb.EvictRequest, context: grpc.aio.ServicerContext) -> pb.EvictResponse:
        return pb.EvictResponse(evicted=self.plane.evict(convert.model_name(request.model)))
