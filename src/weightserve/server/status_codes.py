"""The one place exceptions become gRPC status codes."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from weightserve import errors
from weightserve.server.call_context import current_call

logger = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[BaseException], grpc.StatusCode] = {
    errors.ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.TensorNotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.JobNotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.UploadNotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.PreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.UnsafeCheckpointError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.CorruptCheckpointError: grpc.StatusCode.DATA_LOSS,
    errors.IntegrityError: grpc.StatusCode.DATA_LOSS,
    errors.ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    errors.UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    errors.UnavailableError: grpc.StatusCode.UNAVAILABLE,
    errors.StreamStalledError: grpc.StatusCode.DEADLINE_EXCEEDED,
}

RETRY_AFTER_KEY = "retry-after-ms"
"""Trailing metadata that tells a client when a RESOURCE_EXHAUSTED is worth retrying (docs/wire.md)."""


MAX_MESSAGE = 1024
"""Longest status message sent: it travels in trailing metadata, which gRPC caps at 8 KiB."""


def shorten(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` cut to `limit` characters, saying how much was cut."""
    return text if len(text) <= limit else f"{text[: limit - 40]}... ({len(text) - limit + 40} more characters)"


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and message a client sees for `exc`.

    Known errors keep their message (at most MAX_MESSAGE characters); anything else is
    INTERNAL with a generic message (the traceback goes to the log, not to the client).
    """
    for cls in type(exc).__mro__:
        code = STATUS_BY_ERROR.get(cls)
        if code is not None:
            return code, shorten(str(exc))
    logger.error("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal server error; the server log has the details"


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """End the call with `exc`'s status; the trailing metadata carries the request id, and a
    retry-after hint when the error has one."""
    retry_after = getattr(exc, "retry_after", None)
    extra = ((RETRY_AFTER_KEY, str(max(1, round(retry_after * 1000)))),) if retry_after is not None else ()
    context.set_trailing_metadata(current_call().trailing_metadata(*extra))
    await context.abort(*status_for(exc))


Request = TypeVar("Request")
Response = TypeVar("Response")


def call_errors(
    method: Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]],
) -> Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]:
    """Decorate a servicer coroutine (a unary call, or a stream written with context.write) so
    raised errors become statuses."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Request, context: grpc.aio.ServicerContext) -> Response:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await abort_with(context, e)
        raise AssertionError("context.abort returned")  # pragma: no cover

    return wrapper


def stream_errors(
    method: Callable[[Any, Request, grpc.aio.ServicerContext], AsyncIterator[Response]],
) -> Callable[[Any, Request, grpc.aio.ServicerContext], AsyncIterator[Response]]:
    """Decorate a server-streaming servicer method so raised errors become statuses."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Request, context: grpc.aio.ServicerContext) -> AsyncIterator[Response]:
        try:
            async for item in method(self, request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await abort_with(context, e)

    return wrapper
