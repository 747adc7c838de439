"""Metadata the client adds to every call: its token, and who is calling over a Unix socket.

The token (client/security.py) is `authorization: Bearer ...`. The server limits
concurrent streams per peer; over TCP a peer is an IP address, but every caller on a
Unix socket looks the same to gRPC, so the client names its process
(`x-weightserve-pid`). It is a courtesy, not a credential: a process that lies evades
only its own per-peer limit, never the server's overall one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import grpc

from weightserve.addresses import dial_address
from weightserve.errors import InvalidRequestError

PID_METADATA = "x-weightserve-pid"


def target(address: str) -> str:
    """A gRPC target from 'host:port', 'unix:/path' or a bare '/path' socket.

    Raises:
        InvalidRequestError: the address is none of those (no port, a port outside 1-65535, empty).
    """
    try:
        dial_address(address)
    except ValueError as e:
        raise InvalidRequestError(f"server address {address!r} {e}") from None
    return f"unix:{address}" if address.startswith("/") else address


def is_unix(target: str) -> bool:
    """Whether a gRPC target is a Unix socket ('unix:/path', 'unix-abstract:name')."""
    return target.startswith(("unix:", "unix-abstract:"))


def identity() -> tuple[tuple[str, str], ...]:
    """The metadata that names this process (computed per call: a forked worker has its own pid)."""
    return ((PID_METADATA, str(os.getpid())),)


class CallMetadata:
    """What every call of one channel carries: fixed pairs (the token) and, over a Unix socket, the pid."""

    def __init__(self, fixed: tuple[tuple[str, str], ...], unix: bool) -> None:
        self.fixed = fixed
        self.unix = unix

    def __bool__(self) -> bool:
        return bool(self.fixed) or self.unix

    def pairs(self) -> tuple[tuple[str, str], ...]:
        return (*self.fixed, *identity()) if self.unix else self.fixed


class _Details(grpc.ClientCallDetails):
    def __init__(self, details: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = details.wait_for_ready
        self.compression = getattr(details, "compression", None)


class MetadataInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
):
    """Adds a channel's CallMetadata to every call of a (sync) channel."""

    def __init__(self, metadata: CallMetadata) -> None:
        self.metadata = metadata

    def _details(self, details: Any) -> Any:
        return _Details(details, (*tuple(details.metadata or ()), *self.metadata.pairs()))

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


class _AsyncMetadata:
    def __init__(self, metadata: CallMetadata) -> None:
        self.metadata = metadata

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=grpc.aio.Metadata(*tuple(details.metadata or ()), *self.metadata.pairs()))


class _AsyncUnaryUnary(_AsyncMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _AsyncUnaryStream(_AsyncMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _AsyncStreamUnary(_AsyncMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def async_metadata_interceptors(metadata: CallMetadata) -> list[Any]:
    """Interceptors that add `metadata` to every call of an asyncio channel.

    One per kind of call: grpc.aio files an interceptor under the first kind it is an
    instance of, so one object for both would never see a stream.
    """
    return [_AsyncUnaryUnary(metadata), _AsyncUnaryStream(metadata), _AsyncStreamUnary(metadata)]
