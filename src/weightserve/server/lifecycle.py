"""Building and running the gRPC server.

`build_server(config)` returns an unstarted server and its bound port, so tests bind
port 0. `serve(config)` runs it until SIGTERM/SIGINT, then marks health NOT_SERVING,
stops taking new RPCs and lets streams in flight finish within the grace period.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from weightserve.cache.budget import reserved_bytes
from weightserve.cache.model_cache import ModelCache
from weightserve.config import ServerConfig
from weightserve.loaders.dummy import dummy_locations
from weightserve.server.control_plane import ControlPlane
from weightserve.server.control_servicer import ControlServicer
from weightserve.server.data_plane import DataPlane
from weightserve.server.memory import MemoryTrimmer
from weightserve.server.stream_gate import StreamGate
from weightserve.server.weight_servicer import PREENCODED_RESPONSES, WeightServicer
from weightserve.storage import allowed_schemes, storage_for
from weightserve.storage.local import LocalRoots
from weightserve.storage.router import StorageRouter
from weightserve.v1 import weightserve_pb2 as pb

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["WeightService"].full_name
CONTROL_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ControlService"].full_name


def _handlers(servicer: Any, service_name: str, preencoded: frozenset[str]) -> grpc.GenericRpcHandler:
    """Method handlers built from the proto descriptor; `preencoded` methods yield bytes."""
    service = pb.DESCRIPTOR.services_by_name[service_name.rsplit(".", 1)[-1]]
    handlers = {}
    for method in service.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        factory = (
            grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=request_cls.FromString,
            response_serializer=None if method.name in preencoded else response_cls.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Keepalive so a dead peer is noticed; clients may ping while streaming."""
    return [
        ("grpc.keepalive_time_ms", int(config.keepalive_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_seconds * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.so_reuseport", 0),
    ]


@dataclass
class Server:
    """A built server and what it owns."""

    grpc_server: grpc.aio.Server
    port: int
    health: Any  # grpc_health.v1.health.aio.HealthServicer (untyped in grpc-stubs)
    cache: ModelCache
    executor: ThreadPoolExecutor
    gate: StreamGate

    async def start(self) -> None:
        await self.grpc_server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(CONTROL_SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None) -> None:
        """Health NOT_SERVING, refuse new RPCs, drain streams for `grace` seconds, close."""
        await self.health.enter_graceful_shutdown()
        await self.grpc_server.stop(grace)
        self.cache.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


def build_server(config: ServerConfig) -> Server:
    """An unstarted server bound to `config.listen` (port 0 picks a free port)."""
    roots = LocalRoots(config.model_roots)
    for name, where in roots.shadowed().items():
        logger.warning("model %s is under several roots; serving it from %s", name, where[0])
    remotes = {scheme: storage_for(scheme, config) for scheme in allowed_schemes(config.allow_source)}
    reserved = reserved_bytes(config.read_threads, config.chunk_bytes)
    router = StorageRouter(roots, remotes, config.allow_source, dummy_locations(config.dummy))
    cache = ModelCache(router, config.cache_memory, reserved, loaders={"safetensors": config.loader})
    executor = ThreadPoolExecutor(max_workers=config.read_threads, thread_name_prefix="weightserve-read")
    control = ControlPlane(cache, executor, config.eplb_window)
    plane = DataPlane(config, cache, executor, control)
    trimmer = MemoryTrimmer(executor)
    gate = StreamGate(config.max_streams, config.max_streams_per_peer, config.stream_idle_seconds, trimmer.after_stream)
    server = grpc.aio.server(options=server_options(config))
    server.add_generic_rpc_handlers(
        [
            _handlers(WeightServicer(plane, gate), SERVICE_NAME, PREENCODED_RESPONSES),
            _handlers(ControlServicer(control), CONTROL_SERVICE_NAME, frozenset()),
        ]
    )
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, CONTROL_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    port = server.add_insecure_port(config.listen)
    if port == 0 and not config.listen.startswith("unix:"):
        raise OSError(f"could not bind {config.listen}")
    return Server(server, port, health_servicer, cache, executor, gate)


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain gracefully."""
    server = build_server(config)
    await server.start()
    host = config.listen.rsplit(":", 1)[0]
    logger.info("weightserve listening on %s:%d, roots %s", host, server.port, [str(r) for r in config.model_roots])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("draining: refusing new calls, waiting up to %.0fs for streams in flight", config.grace_seconds)
    await server.stop(config.grace_seconds)
    logger.info("stopped")


def main(config: ServerConfig) -> None:
    """Process entry: uvloop where available."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))
