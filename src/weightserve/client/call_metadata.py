"""Metadata the client adds to every call: who is calling, over a Unix socket.

The server limits concurrent streams per peer; over TCP a peer is an IP address, but
every caller on a Unix socket looks the same to gRPC, so the client names its process
(`x-weightserve-pid`). It is a courtesy, not a credential: a process that lies evades
only its own per-peer limit, never the server's overall one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import grpc

PID_METADATA = "x-weightserve-pid"


def is_unix(target: str) -> bool:
    """Whether a gRPC target is a Unix socket ('unix:/path', 'unix-abstract:name')."""
    return target.startswith(("unix:", "unix-abstract:"))


def identity() -> tuple[tuple[str, str], ...]:
    """The metadata that names this process (computed per call: a forked worker has its own pid)."""
    return ((PID_METADATA, str(os.getpid())),)


class _Details(grpc.ClientCallDetails):
    def __init__(self, details: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = details.wait_for_ready
        self.compression = getattr(details, "compression", None)


def _with_identity(details: Any) -> Any:
    return _Details(details, (*tuple(details.metadata or ()), *identity()))


class IdentityInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
):
    """Adds the caller's pid to every call of a (sync) channel."""

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(_with_identity(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(_with_identity(details), request)


class AsyncIdentityInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
):
    """Adds the caller's pid to every call of an asyncio channel."""

    async def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await continuation(_with_aio_identity(details), request)

    async def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await continuation(_with_aio_identity(details), request)


def _with_aio_identity(details: Any) -> Any:
    metadata = grpc.aio.Metadata(*tuple(details.metadata or ()), *identity())
    return details._replace(metadata=metadata)
