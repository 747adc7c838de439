"""Building a server from its configuration: storage, cache, planes, servicers, observability.

`build_server(config)` returns an unstarted Server bound to `config.listen` (port 0
picks a free port, so tests can run many); nothing listens or scans until `start()`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer as AsyncReflectionServicer

from weightserve.cache.model_cache import ModelCache
from weightserve.cache.segment_leases import SegmentLeases
from weightserve.config import ServerConfig, reserved_bytes
from weightserve.loaders.dummy import dummy_locations
from weightserve.recording import NULL_RECORDER, Recorder
from weightserve.server import gauges
from weightserve.server.auth import AuthInterceptor
from weightserve.server.control_plane import ControlPlane
from weightserve.server.control_servicer import ControlServicer
from weightserve.server.data_plane import DataPlane
from weightserve.server.fd_handoff import Handoff, handoff_path, socket_path
from weightserve.server.interceptors import ObservingInterceptor
from weightserve.server.memory import MemoryTrimmer
from weightserve.server.metrics import PrometheusRecorder, StateCollector
from weightserve.server.process import Server, SidePortSpec
from weightserve.server.replica_fill import ReplicaFillServicer, coordinate, disk_caches
from weightserve.server.segment_plane import SegmentPlane
from weightserve.server.stream_gate import StreamGate
from weightserve.server.tls import ReloadingCertificates, TlsFiles
from weightserve.server.tokens import TokenFile
from weightserve.server.version_servicer import VersionServicer
from weightserve.server.versions import Versions
from weightserve.server.weight_servicer import PREENCODED_RESPONSES, WeightServicer
from weightserve.state.control_store import ControlStore
from weightserve.storage import allowed_schemes, storage_for
from weightserve.storage.local import LocalRoots
from weightserve.storage.router import StorageRouter
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["WeightService"].full_name
CONTROL_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ControlService"].full_name
VERSION_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VersionService"].full_name
REPLICA_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ReplicaService"].full_name
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
DEFAULT_METRICS_PORT = 9400


def build_server(config: ServerConfig) -> Server:
    """An unstarted server bound to `config.listen`.

    Raises:
        ValueError: a model root is missing or unreadable (and missing roots are not allowed).
        OSError: the address cannot be bound.
    """
    check_roots(config)
    roots = LocalRoots(config.model_roots)
    for name, where in roots.shadowed().items():
        logger.warning("model %s is under several roots; serving it from %s", name, where[0])
    remotes = {scheme: storage_for(scheme, config) for scheme in allowed_schemes(config.allow_source)}
    router = StorageRouter(roots, remotes, config.allow_source, dummy_locations(config.dummy))
    fill_caches = disk_caches(remotes)
    metrics = config.metrics_listen != "off"
    recorder: Recorder = NULL_RECORDER
    if metrics:
        recorder = prometheus = PrometheusRecorder()
    coordinate(config, fill_caches, recorder=recorder)  # --coordination: one origin download per model
    reserved = reserved_bytes(config.read_threads, config.chunk_bytes)
    cache = ModelCache(router, config.cache_memory, reserved, loaders={"safetensors": config.loader}, recorder=recorder)
    executor = ThreadPoolExecutor(max_workers=config.read_threads, thread_name_prefix="weightserve-read")
    control_store = ControlStore(config.state_dir / "control") if config.state_dir is not None else None
    control = ControlPlane(cache, executor, config.eplb_window, recorder, control_store)
    versions = Versions(cache, config.state_dir, config.max_versions)
    plane = DataPlane(config, cache, executor, control, versions)
    trimmer = MemoryTrimmer(executor)
    gate = StreamGate(config.max_streams, config.max_streams_per_peer, config.stream_idle_seconds, trimmer.after_stream)
    tokens = TokenFile(config.auth_tokens) if config.auth_tokens is not None else None
    certificates = ReloadingCertificates(tls_files(config)) if config.tls_cert is not None else None
    interceptors = [ObservingInterceptor(recorder), AuthInterceptor(tokens, recorder)]
    handoff_at = handoff_path(config.listen)
    handoff = Handoff(handoff_at) if handoff_at is not None else None
    segments = SegmentPlane(plane, SegmentLeases(cache, executor), handoff, executor)
    weights, controls = WeightServicer(plane, gate, segments), ControlServicer(control)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    server, control_server = _grpc_servers(config, interceptors, weights, controls, VersionServicer(versions))
    pb_grpc.add_ReplicaServiceServicer_to_server(ReplicaFillServicer(fill_caches, recorder=recorder), server)
    ports = []
    for grpc_server, flag, address in (
        (server, "--listen", config.listen),
        (control_server, "--control-listen", config.control_listen),
    ):
        if grpc_server is None:
            continue
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
        _enable_reflection(grpc_server)
        ports.append(_listen(grpc_server, flag, address, certificates))
    warn_if_exposed(config)
    side = None
    if metrics:
        label = _model_label(cache)
        prometheus.known_model = lambda name: label(name) == name
        prometheus.registry.register(StateCollector(gauges.sources(cache, gate, remotes, control)))
        host, side_port = metrics_address(config)
        side = SidePortSpec(host, side_port, prometheus.registry)
    services = (SERVICE_NAME, CONTROL_SERVICE_NAME, VERSION_SERVICE_NAME)
    return Server(
        server,
        ports[0],
        health_servicer,
        services,
        cache,
        executor,
        gate,
        side,
        control_server=control_server,
        control_port=ports[1] if control_server is not None else 0,
        tokens=tokens,
        certificates=certificates,
        handoff=handoff,
        control=control,
        socket_files=_socket_files(config, handoff_at),
        socket_mode=int(config.socket_mode, 8) if config.socket_mode else None,
    )


def _grpc_servers(
    config: ServerConfig,
    interceptors: list[Any],
    weights: WeightServicer,
    controls: ControlServicer,
    publishing: VersionServicer,
) -> tuple[grpc.aio.Server, grpc.aio.Server | None]:
    """The data port's server and, with --control-listen, the control port's, with their services.

    With --control-listen the data port still knows every ControlService method, Prefetch
    and Evict, and answers each UNIMPLEMENTED naming the flag, so a caller dialling the
    wrong port learns where to go rather than grpc's bare "Method not found!".
    """
    server = grpc.aio.server(options=server_options(config), interceptors=interceptors)
    if config.control_listen:  # the data port answers the control methods with where they are
        every_control_method = frozenset(m.name for m in pb.DESCRIPTOR.services_by_name["ControlService"].methods)
        server.add_generic_rpc_handlers(
            [
                _handlers(weights, SERVICE_NAME, PREENCODED_RESPONSES, elsewhere=CONTROL_METHODS),
                _handlers(controls, CONTROL_SERVICE_NAME, frozenset(), elsewhere=every_control_method),
            ]
        )
        control_server: grpc.aio.Server | None = grpc.aio.server(
            options=server_options(config), interceptors=interceptors
        )
        control_server.add_generic_rpc_handlers(  # type: ignore[union-attr]
            [
                _handlers(weights, SERVICE_NAME, PREENCODED_RESPONSES, only=CONTROL_METHODS),
                _handlers(controls, CONTROL_SERVICE_NAME, frozenset()),
            ]
        )
    else:
        control_server = None
        server.add_generic_rpc_handlers(
            [
                _handlers(weights, SERVICE_NAME, PREENCODED_RESPONSES),
                _handlers(controls, CONTROL_SERVICE_NAME, frozenset()),
            ]
        )
    server.add_generic_rpc_handlers([_handlers(publishing, VERSION_SERVICE_NAME, frozenset())])
    return server, control_server


CONTROL_METHODS = frozenset({"Prefetch", "Evict"})
"""WeightService methods that move to --control-listen with ControlService."""


def tls_files(config: ServerConfig) -> TlsFiles:
    assert config.tls_cert is not None and config.tls_key is not None  # ServerConfig pairs them
    return TlsFiles(config.tls_cert, config.tls_key, config.tls_client_ca)


def _listen(server: grpc.aio.Server, flag: str, address: str, certificates: ReloadingCertificates | None) -> int:
    """Bind `address` (TLS when there are certificates); the port bound.

    Raises:
        OSError: one line naming the flag when the address cannot be bound.
    """
    refuse_live_socket(flag, address)
    try:
        if certificates is not None:
            port = server.add_secure_port(address, certificates.credentials())
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as e:
        raise OSError(f"{flag} {address}: cannot listen there ({e}; is another server running there?)") from None
    if port == 0 and not address.startswith("unix:"):
        raise OSError(f"{flag} {address}: cannot listen there (is another server running there?)")
    return port


def refuse_live_socket(flag: str, address: str) -> None:
    """Refuse a Unix socket another process still listens on: binding replaces the file, and
    the running server would go on, SERVING, with nobody able to reach it. A socket file
    that refuses connections is a dead server's, and is replaced.

    Raises:
        OSError: one line naming the flag when something answers there.
    """
    grpc_socket, side_socket = socket_path(address), handoff_path(address)
    for path, kind in ((grpc_socket, socket.SOCK_STREAM), (side_socket, socket.SOCK_SEQPACKET)):
        if path is None or not path.is_socket():
            continue
        with socket.socket(socket.AF_UNIX, kind) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(str(path))
            except OSError:
                continue  # refused: a dead server's file (or not ours to judge: binding says the rest)
        raise OSError(f"{flag} {address}: another server is listening on {path}; stop it first")


def warn_if_exposed(config: ServerConfig) -> None:
    """One warning at start when a port beyond loopback has neither TLS nor tokens."""
    if config.tls_cert is not None or config.auth_tokens is not None:
        return
    exposed = [a for a in (config.listen, config.control_listen) if a and not _is_local_address(a)]
    if exposed:
        logger.warning(
            "serving %s with neither TLS nor tokens: anyone who can reach it can read every model, evict the "
            "cache and rebalance experts; give --tls-cert/--tls-key and --auth-tokens on a shared network",
            " and ".join(exposed),
        )


def _is_local_address(address: str) -> bool:
    if address.startswith("unix:"):
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_roots(config: ServerConfig) -> None:
    """Refuse a model root that does not exist or cannot be read, unless --allow-missing-roots.

    A typo in a root would otherwise start a server that serves nothing and says SERVING.
    """
    for root in config.model_roots:
        problem = ""
        if not root.exists():
            problem = "does not exist"
        elif not root.is_dir():
            problem = "is not a directory"
        elif not os.access(root, os.R_OK | os.X_OK):
            problem = "cannot be read by this process"
        if not problem:
            continue
        if not config.allow_missing_roots:
            raise ValueError(
                f"model root {root} {problem}; fix the path or pass --allow-missing-roots for a root mounted later"
            )
        logger.warning("model root %s %s; serving it once it appears (--allow-missing-roots)", root, problem)


def metrics_address(config: ServerConfig) -> tuple[str, int]:
    """Where the side port listens: --metrics-listen, else the gRPC host on port 9400.

    A gRPC address on port 0 (a free port, as tests ask) gives the side port a free port
    too; a Unix socket gives loopback, so the metrics bind no wider than the gRPC port.
    """
    if config.metrics_listen:
        host, _, port = config.metrics_listen.rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)
    if config.listen.startswith("unix:"):
        return "127.0.0.1", DEFAULT_METRICS_PORT
    host, _, port = config.listen.rpartition(":")
    return host.strip("[]"), 0 if port == "0" else DEFAULT_METRICS_PORT


def _model_label(cache: ModelCache) -> Any:
    """A model's metric label: its name once the server opened it, else "other" (bounded labels)."""

    def label(name: str) -> str:
        return name if any(entry.name == name for entry in cache.open_entries()) else "other"

    return label


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


def _enable_reflection(server: grpc.aio.Server) -> None:
    """Server reflection under both v1alpha (what grpcio-reflection ships) and v1 (what grpcurl
    and newer tools ask first). The two protos differ only in their package name, so the
    v1alpha servicer answers v1 requests byte for byte."""
    names = [
        SERVICE_NAME, CONTROL_SERVICE_NAME, VERSION_SERVICE_NAME, REPLICA_SERVICE_NAME, health.SERVICE_NAME,
        reflection.SERVICE_NAME, REFLECTION_V1,
    ]  # fmt: skip
    servicer = AsyncReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": v1})])


def _handlers(
    servicer: Any,
    service_name: str,
    preencoded: frozenset[str],
    *,
    only: frozenset[str] | None = None,
    elsewhere: frozenset[str] = frozenset(),
) -> grpc.GenericRpcHandler:
    """Method handlers built from the proto descriptor; `preencoded` methods yield bytes.

    `only` limits the service to those methods; `elsewhere` methods answer that they are
    served on the control address (rather than grpc's bare UNIMPLEMENTED).
    """
    service = pb.DESCRIPTOR.services_by_name[service_name.rsplit(".", 1)[-1]]
    handlers = {}
    for method in service.methods:
        if only is not None and method.name not in only:
            continue
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        factory = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        behavior = _served_elsewhere(method.name) if method.name in elsewhere else getattr(servicer, method.name)
        handlers[method.name] = factory(
            behavior,
            request_deserializer=request_cls.FromString,
            response_serializer=None if method.name in preencoded else response_cls.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _served_elsewhere(method: str) -> Any:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, f"{method} is served on the control address (--control-listen), not here"
        )

    return refuse


def _socket_files(config: ServerConfig, handoff_at: Path | None) -> tuple[Path, ...]:
    """The files of the Unix sockets the server listens on (--socket-mode applies to them)."""
    found = (socket_path(config.listen), socket_path(config.control_listen), handoff_at)
    return tuple(path for path in found if path is not None)
