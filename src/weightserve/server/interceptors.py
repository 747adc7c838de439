"""The observing interceptor: every call counted, timed and logged in one line, with a request id.

For each call it opens a CallRecord (server/call_context.py), counts it under the names
the widely used gRPC interceptors emit (grpc_server_started_total, ..._handled_total,
..._handling_seconds, ..._msg_sent_total), and when it ends writes one access log line
at INFO: method, model, shard spec, bytes, seconds, status code, peer and request id.
A client that goes away mid-call is CANCELLED at INFO, not an error. The request id is
the caller's `x-request-id` (or a new one) and goes back in trailing metadata.

Health checks are logged at DEBUG: probes arrive every few seconds and would drown the log.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from weightserve.recording import Recorder
from weightserve.server.call_context import CallRecord, close_call, open_call, request_id_from
from weightserve.server.log_text import escape_text, field

access_log = logging.getLogger("weightserve.access")

QUIET_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"})


class _ObservedContext:
    """The servicer context, counting what is written and noting how the call is aborted."""

    def __init__(self, context: Any, record: CallRecord, on_message: Callable[[], None]) -> None:
        self._context = context
        self._record = record
        self._on_message = on_message

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self._on_message()

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        self._record.code, self._record.details = code.name, details
        await self._context.abort(code, details, trailing_metadata)

    def set_trailing_metadata(self, metadata: Any) -> None:
        self._context.set_trailing_metadata(metadata)


class ObservingInterceptor(grpc.aio.ServerInterceptor):
    """Counts, times and logs every call of the server it is installed on."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or (handler.request_streaming and handler.stream_unary is None):
            return handler  # unknown methods (UNIMPLEMENTED) and reflection's bidi stream pass as they are
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        if handler.stream_unary is not None:  # an upload (PublishVersion): timed and logged as a unary call
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, service, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, service, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        behavior = handler.unary_stream
        if behavior is None:  # a stream-unary handler: none in this server
            return handler
        wrapped = (
            self._generator(behavior, service, method)
            if inspect.isasyncgenfunction(behavior)
            else self._writer(behavior, service, method)
        )
        return grpc.unary_stream_rpc_method_handler(
            wrapped, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )

    def _start(self, service: str, method: str, kind: str, context: Any) -> CallRecord:
        record = CallRecord(service, method, context.peer(), request_id_from(context.invocation_metadata()))
        self.recorder.rpc_started(service, method, kind)
        return record

    def _finish(self, record: CallRecord, kind: str, context: Any, error: BaseException | None) -> None:
        if isinstance(error, asyncio.CancelledError):
            record.code = "CANCELLED"
        elif error is not None and record.code == "OK" and not isinstance(error, grpc.aio.AbortError):
            record.code = "UNKNOWN"  # what grpc answers for an exception no servicer decorator caught
        seconds = record.seconds
        self.recorder.rpc_handled(record.service, record.method, kind, record.code, seconds)
        log_call(record, seconds)

    def _unary(self, behavior: Callable[..., Any], service: str, method: str) -> Callable[..., Any]:
        async def observed(request: Any, context: Any) -> Any:
            record = self._start(service, method, "unary", context)
            token = open_call(record)
            error: BaseException | None = None
            try:
                response = await behavior(request, _ObservedContext(context, record, _noop))
                context.set_trailing_metadata(record.trailing_metadata())
                self.recorder.rpc_message_sent(service, method, "unary")
                return response
            except BaseException as e:
                error = e
                raise
            finally:
                close_call(token)
                self._finish(record, "unary", context, error)

        return observed

    def _writer(self, behavior: Callable[..., Any], service: str, method: str) -> Callable[..., Any]:
        def sent(record: CallRecord) -> Callable[[], None]:
            def count() -> None:
                record.messages += 1
                self.recorder.rpc_message_sent(service, method, "server_stream")

            return count

        async def observed(request: Any, context: Any) -> None:
            record = self._start(service, method, "server_stream", context)
            token = open_call(record)
            error: BaseException | None = None
            try:
                await behavior(request, _ObservedContext(context, record, sent(record)))
                context.set_trailing_metadata(record.trailing_metadata())
            except BaseException as e:
                error = e
                raise
            finally:
                close_call(token)
                self._finish(record, "server_stream", context, error)

        return observed

    def _generator(self, behavior: Callable[..., Any], service: str, method: str) -> Callable[..., Any]:
        async def observed(request: Any, context: Any) -> AsyncIterator[Any]:
            record = self._start(service, method, "server_stream", context)
            token = open_call(record)
            error: BaseException | None = None
            try:
                async for message in behavior(request, _ObservedContext(context, record, _noop)):
                    record.messages += 1
                    self.recorder.rpc_message_sent(service, method, "server_stream")
                    yield message
                context.set_trailing_metadata(record.trailing_metadata())
            except BaseException as e:
                error = e
                raise
            finally:
                close_call(token)
                self._finish(record, "server_stream", context, error)

        return observed


def _noop() -> None:
    return None


def log_call(record: CallRecord, seconds: float) -> None:
    """The access log line of a finished call (DEBUG for health checks and reflection).

    Caller-supplied values are escaped (server/log_text.py): none can start a new line.
    """
    level = logging.DEBUG if record.service in QUIET_SERVICES else logging.INFO
    if not access_log.isEnabledFor(level):
        return
    access_log.log(
        level,
        "%s %s%s%s %d bytes %.3fs %s peer=%s token=%s request_id=%s%s",
        field(record.method),
        field(record.model) if record.model else "-",
        f" [{escape_text(record.shard)}]" if record.shard else "",
        f" {record.messages} msgs" if record.messages else "",
        record.bytes,
        seconds,
        record.code,
        field(record.peer),
        field(record.caller) if record.caller else "-",
        field(record.request_id),
        f" ({escape_text(record.details[:200])})" if record.details and record.code != "OK" else "",
        extra={
            "rpc": record.method,
            "service": record.service,
            "model": record.model,
            "shard": record.shard,
            "bytes": record.bytes,
            "messages": record.messages,
            "seconds": round(seconds, 6),
            "code": record.code,
            "peer": record.peer,
            "token": record.caller,
            "request_id": record.request_id,
            "details": record.details[:200],
        },
    )
