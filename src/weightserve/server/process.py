"""A built server and what it owns: start (scan the roots, then SERVING), drain, close.

Health is NOT_SERVING until the model roots have been scanned (a first ListModels or
fetch would otherwise pay for the walk, and a probe would call the server ready before
it can answer), and again from the moment a drain begins. The side port (/metrics,
/readyz, /livez) says the same in plain HTTP for probes that cannot speak gRPC or TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from weightserve.cache.model_cache import ModelCache
from weightserve.server.control_plane import ControlPlane
from weightserve.server.fd_handoff import Handoff
from weightserve.server.http_endpoints import SidePort
from weightserve.server.stream_gate import StreamGate
from weightserve.server.tls import ReloadingCertificates
from weightserve.server.tokens import TokenFile

logger = logging.getLogger(__name__)


@dataclass
class Server:
    """A built server: the gRPC server, its health service, cache, read pool and side port."""

    grpc_server: grpc.aio.Server
    port: int
    health: Any  # grpc_health.v1.health.aio.HealthServicer (untyped in grpc-stubs)
    services: tuple[str, ...]
    cache: ModelCache
    executor: ThreadPoolExecutor
    gate: StreamGate
    side_port: SidePortSpec | None = None
    side: SidePort | None = None
    control_server: grpc.aio.Server | None = None
    """The second gRPC server of --control-listen (ControlService, Prefetch, Evict), if any."""
    control_port: int = 0
    tokens: TokenFile | None = None
    """The --auth-tokens file in force (reloaded on SIGHUP by the process entry)."""
    certificates: ReloadingCertificates | None = None
    handoff: Handoff | None = None
    """The side socket of shared-memory segments (a server on a Unix socket only)."""
    control: ControlPlane | None = None
    socket_files: tuple[Path, ...] = ()
    """The Unix sockets it listens on, given `socket_mode` once they exist."""
    socket_mode: int | None = None
    """Its load windows are snapshotted to the state dir while the server runs (when there is one)."""
    ready: bool = False
    models_at_start: int = field(default=0)
    _snapshots: asyncio.Task[None] | None = None

    @property
    def grpc_servers(self) -> list[grpc.aio.Server]:
        return [s for s in (self.grpc_server, self.control_server) if s is not None]

    async def start(self) -> None:
        """Listen, scan the roots, then report SERVING (and start the side port)."""
        for service in ("", *self.services):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        for grpc_server in self.grpc_servers:
            await grpc_server.start()
        if self.handoff is not None:
            await self.handoff.start()
        if self.socket_mode is not None:  # before SERVING: no worker of the group is refused in between
            for path in self.socket_files:
                os.chmod(path, self.socket_mode)
        if self.side_port is not None:
            spec = self.side_port
            self.side = SidePort(spec.host, spec.port, spec.registry, lambda: self.ready, asyncio.get_running_loop())
            self.side.start()
        self.models_at_start = len(await asyncio.to_thread(self.cache.local_models))
        if self.control is not None and self.control.store is not None:
            self._snapshots = asyncio.ensure_future(self.control.keep_snapshots())
        for service in ("", *self.services):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.ready = True

    async def stop(self, grace: float | None) -> None:
        """Not ready, health NOT_SERVING, refuse new RPCs, drain streams for `grace` seconds, close."""
        self.ready = False
        await self.health.enter_graceful_shutdown()
        await asyncio.gather(*(grpc_server.stop(grace) for grpc_server in self.grpc_servers))
        if self._snapshots is not None:  # its last snapshot runs as it is cancelled
            self._snapshots.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._snapshots
        if self.handoff is not None:  # clients keep their mappings; their leases end here
            await self.handoff.stop()
        self.cache.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.side is not None:
            self.side.stop()


@dataclass(frozen=True)
class SidePortSpec:
    """Where the side port listens and what /metrics serves."""

    host: str
    port: int
    registry: Any  # prometheus_client.CollectorRegistry
