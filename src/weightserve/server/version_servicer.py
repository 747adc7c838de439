"""VersionService servicer: publishing versions, listing them, and watching for new ones."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from weightserve.errors import InvalidRequestError
from weightserve.server import proto_convert as convert
from weightserve.server import request_limits as limits
from weightserve.server.auth import current_caller
from weightserve.server.call_context import current_call
from weightserve.server.status_codes import call_errors, stream_errors
from weightserve.server.versions import Versions
from weightserve.v1 import weightserve_pb2 as pb

MAX_UPLOAD_ID_BYTES = 64


class VersionServicer:
    """Implements weightserve.v1.VersionService over Versions."""

    def __init__(self, versions: Versions) -> None:
        self.versions = versions

    @call_errors
    async def StartPublish(
        self, request: pb.StartPublishRequest, context: grpc.aio.ServicerContext
    ) -> pb.PublishStatus:
        model = convert.model_name(request.model)
        base = request.base_version if request.HasField("base_version") else None
        upload = await self.versions.start(model, base, convert.declared_tensors(request))
        return convert.publish_status(upload)

    @call_errors
    async def PublishVersion(
        self, request_iterator: AsyncIterator[pb.PublishVersionRequest], context: grpc.aio.ServicerContext
    ) -> pb.PublishStatus:
        upload = None
        async for message in request_iterator:
            upload_id = limits.check_text("upload id", message.upload_id, MAX_UPLOAD_ID_BYTES)
            if upload is None or upload.upload_id != upload_id:
                upload = self.versions.upload(upload_id, current_caller().may_read)
                current_call().note_model(upload.model)  # the audit line names the model published
            if message.HasField("chunk"):
                chunk = message.chunk
                await self.versions.write(
                    upload, chunk.tensor_index, chunk.offset, chunk.data, chunk.crc32c, chunk.last, chunk.tensor_crc32c
                )
            if message.commit:
                version = await self.versions.commit(upload)
                return convert.publish_status(upload, version.version)
        if upload is None:
            raise InvalidRequestError("an upload stream needs at least one message naming its upload_id")
        return convert.publish_status(upload)

    @call_errors
    async def GetPublish(self, request: pb.GetPublishRequest, context: grpc.aio.ServicerContext) -> pb.PublishStatus:
        upload_id = limits.check_text("upload id", request.upload_id, MAX_UPLOAD_ID_BYTES)
        committed = self.versions.committed(upload_id, current_caller().may_read)
        if committed is not None:
            model, version = committed
            current_call().note_model(model)
            return pb.PublishStatus(upload_id=upload_id, model=model, committed=True, version=version)
        upload = self.versions.upload(upload_id, current_caller().may_read)
        current_call().note_model(upload.model)
        return convert.publish_status(upload, upload.committed_version)

    @call_errors
    async def ListVersions(
        self, request: pb.ListVersionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListVersionsResponse:
        summaries = await self.versions.summaries(convert.model_name(request.model))
        return pb.ListVersionsResponse(versions=[convert.version_info(s) for s in summaries])

    @stream_errors
    async def WatchVersions(
        self, request: pb.WatchVersionsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.VersionInfo]:
        serving = request.serving_version if request.HasField("serving_version") else None
        async for summary in self.versions.watch(convert.model_name(request.model), request.after_version, serving):
            yield convert.version_info(summary)
