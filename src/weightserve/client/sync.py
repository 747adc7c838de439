"""WeightClient: the blocking client an inference worker calls at start-up."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Mapping, Sequence
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typing_extensions import Unpack

from weightserve.client import control, routing, shm, versions
from weightserve.client.assembly import FetchStats
from weightserve.client.call_metadata import CallMetadata, MetadataInterceptor, is_unix, target
from weightserve.client.common import (
    FETCH_SHARD,
    PROBE_SECONDS,
    FetchArgs,
    FetchOptions,
    Pause,
    ResumeLoop,
    ShardArgs,
    channel_options,
    fetch_args,
    fetch_error,
    logger,
    redeem_fallback,
    segments_request,
    shm_fallback,
    shm_unsupported,
    unreachable,
)
from weightserve.client.expert_slots import check_expert_slots
from weightserve.client.files import FileWriter
from weightserve.client.manifest_pages import ManifestPages
from weightserve.client.modules import ModuleLoad, check_names, module_destinations
from weightserve.client.placements import manifest_names
from weightserve.client.retry import RetryPolicy
from weightserve.client.security import Pem, security_from
from weightserve.client.stalls import StallWatch
from weightserve.errors import FetchError, IntegrityError, RedeemError
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc

T = TypeVar("T")

MAX_SHORT_UPLOADS = 16
"""Upload streams that may end without an error and without the commit before publish gives up."""


class WeightClient:
    """Fetches state dicts, files and model lists, and drives expert rebalancing.

    Args:
        address: "host:port", "unix:/path" or a bare "/path" socket.
        retry: how a broken FetchShard stream is resumed (the only call that retries).
        timeout: the deadline of each unary call, in seconds. A call waits for the
            channel to become ready within it, so a client may start before its server
            (or ride out a restart) without retrying; a call that fails is not retried.
        token: bearer token for a server with --auth-tokens (default $WEIGHTSERVE_TOKEN).
            Sent only over TLS, to loopback or to a Unix socket, unless allow_insecure_token.
        tls: speak TLS, trusting the system's CAs unless root_certificates is given.
        root_certificates: PEM bytes or path of the CA bundle for the server's certificate
            (default $WEIGHTSERVE_TLS_CA; giving it turns TLS on).
        certificate_chain, private_key: the client certificate and key for mutual TLS
            (default $WEIGHTSERVE_TLS_CERT and $WEIGHTSERVE_TLS_KEY).
        allow_insecure_token: send the token over plaintext to another host anyway.
        server_name: under TLS, the name the server's certificate must carry when it is
            not the address's host (ssl_target_name_override; a fleet's replicas are
            dialled by IP and named by their Service).

    A list of addresses, "a:1,b:2" or "dns:///name:port" (many replicas) makes a
    FleetClient, which routes each model to its replicas and fails over between them
    (client/fleet.py, docs/fleet.md); `fleet_options` are its options
    (replicas_per_model, spread_key, refresh_seconds, connect_timeout, cooldown).

    Raises:
        ValueError: a PEM file cannot be read, a certificate lacks its key, or a token
            would travel in plaintext.

    Example:
        >>> with WeightClient("weights:50051") as client:  # doctest: +SKIP
        ...     sd = client.fetch_state_dict("org/llama-7b", device="cuda")
    """

    def __new__(cls, address: str | Sequence[str], *args: Any, **kwargs: Any) -> WeightClient:
        """A list of addresses, "a:1,b:2" or a dns:/// target makes a FleetClient (client/fleet.py)."""
        if cls is WeightClient and routing.is_fleet(address):
            return super().__new__(fleet.FleetClient)
        return super().__new__(cls)

    def __init__(
        self,
        address: str | Sequence[str],
        *,
        retry: RetryPolicy | None = None,
        timeout: float = 60.0,
        token: str | None = None,
        tls: bool = False,
        root_certificates: Pem | None = None,
        certificate_chain: Pem | None = None,
        private_key: Pem | None = None,
        allow_insecure_token: bool = False,
        server_name: str | None = None,
        **fleet_options: Any,
    ) -> None:
        if fleet_options or not isinstance(address, str):
            raise TypeError(f"{sorted(fleet_options)}: options of a fleet address (a list, a,b or dns:///)")
        self.address = address
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        security = security_from(
            target(address),
            token=token,
            tls=tls,
            root_certificates=root_certificates,
            certificate_chain=certificate_chain,
            private_key=private_key,
            allow_insecure_token=allow_insecure_token,
        )
        credentials = security.credentials()
        if credentials is None:
            self._channel = grpc.insecure_channel(target(address), options=channel_options())
        else:
            named = [("grpc.ssl_target_name_override", server_name)] if server_name else []
            self._channel = grpc.secure_channel(target(address), credentials, options=[*channel_options(), *named])
        metadata = CallMetadata(security.metadata(), is_unix(target(address)))
        if metadata:  # the token; over a Unix socket, this process's pid for the per-peer limits
            self._channel = grpc.intercept_channel(self._channel, MetadataInterceptor(metadata))
        self._stub = pb_grpc.WeightServiceStub(self._channel)
        self._control = pb_grpc.ControlServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._versions = pb_grpc.VersionServiceStub(self._channel)
        self._said_fallback = False
        self._said_redeem = False
        self._fetch = self._channel.unary_stream(
            FETCH_SHARD, request_serializer=pb.FetchShardRequest.SerializeToString, response_deserializer=None
        )
        self.last_fetch_stats: FetchStats | None = None
        """What the latest fetch_state_dict did (bytes, seconds, time to first chunk, resumes, checksum
        re-requests, replica); set once its manifest arrives and filled in as it runs."""

    @property
    def last_stats(self) -> FetchStats | None:
        """The name last_fetch_stats had first."""
        return self.last_fetch_stats

    @last_stats.setter
    def last_stats(self, stats: FetchStats | None) -> None:
        self.last_fetch_stats = stats

    def __enter__(self) -> WeightClient:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, action: str, method: Any, request: Any, extra_seconds: float = 0.0) -> Any:
        """A unary call that waits for a ready channel until its deadline; errors become FetchError."""
        try:
            return method(request, timeout=self.timeout + extra_seconds, wait_for_ready=True)
        except grpc.RpcError as e:
            raise self._why_not_ready(e) or fetch_error(e, action) from None

    def _call_meanwhile(self, action: str, method: Any, request: Any, meanwhile: Callable[[], T]) -> tuple[Any, T]:
        """`_call`, doing `meanwhile` on this thread while the server answers: (the answer, what it returned)."""
        future = method.future(request, timeout=self.timeout, wait_for_ready=True)
        try:
            done = meanwhile()
            return future.result(), done
        except grpc.RpcError as e:
            raise self._why_not_ready(e) or fetch_error(e, action) from None
        finally:
            future.cancel()  # a no-op once answered; otherwise `meanwhile` raised

    def _why_not_ready(self, error: grpc.RpcError) -> FetchError | None:
        """After a wait_for_ready call ran out of time: why the channel never connected (a refused
        connection, a failed TLS handshake), or None when it is connected and the server was slow."""
        if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            return None
        try:
            self._health.Check(health_pb2.HealthCheckRequest(), timeout=PROBE_SECONDS)
        except grpc.RpcError as probe:
            return unreachable(self.address, probe)
        return None

    def list_models(self) -> list[pb.ModelInfo]:
        """Every model the server can serve."""
        return list(self._call("list models", self._stub.ListModels, pb.ListModelsRequest()).models)

    def get_manifest(
        self, model: str, rank: int = 0, world_size: int = 1, **options: Unpack[FetchOptions]
    ) -> pb.GetManifestResponse:
        """One rank's plan: names, shapes, dtypes, sizes, digests and the manifest id.

        Takes fetch_state_dict's arguments; those that do not pick the plan are ignored.
        """
        return self._manifest(fetch_args(model, rank, world_size, options).shard)

    def _manifest(self, shard: ShardArgs) -> pb.GetManifestResponse:
        """The whole plan, read page by page (see ManifestPages)."""
        pages = ManifestPages(shard.model, shard.proto())
        while (request := pages.next_request()) is not None:
            try:
                pages.on_page(self._call(f"manifest of {shard.model}", self._stub.GetManifest, request))
            except FetchError as e:
                pages.on_error(e)
        return pages.result()

    def fetch_state_dict(
        self, model: str, rank: int = 0, world_size: int = 1, **options: Unpack[FetchOptions]
    ) -> dict[str, torch.Tensor]:
        """This rank's tensors, verified, resuming across broken streams.

        Args:
            model: the model name ("org/llama-7b").
            rank: the tensor-parallel rank.
            world_size: the tensor-parallel size.
            **options: keyword-only FetchOptions (names, device, dtype, revision,
                format, layout, pp_rank/pp_size, ep_rank/ep_size, since_mapping,
                destinations); `weightserve.client.common.fetch_args` says what each does.

        Afterwards `last_fetch_stats` says what the fetch did, and one INFO line on the
        `weightserve.client` logger sums it up.

        Raises:
            FetchError: `.code()` is the grpc.StatusCode (NOT_FOUND, INVALID_ARGUMENT,
                FAILED_PRECONDITION when the model changed mid-fetch or `device` is a CUDA
                device this process cannot use, DATA_LOSS, ...).
        """
        started, self.last_fetch_stats = time.monotonic(), None  # never an earlier fetch's, should this one fail
        fetch = fetch_args(model, rank, world_size, options)
        manifest = self._manifest(fetch.shard)
        check_names(manifest, fetch.names, model)
        if self._shared_memory(fetch):
            state = self._fetch_segments(fetch, manifest, started)
            if state is not None:
                return state
        loop = ResumeLoop(fetch, manifest, self.retry, replica=self.address, started=started)
        self.last_fetch_stats = loop.stats
        with loop.stall_watch() as watch:
            while (shard_request := loop.next_request()) is not None:
                stream = self._fetch(shard_request, wait_for_ready=loop.resuming)
                try:
                    loop.receive(stream, watch)
                except IntegrityError as e:
                    loop.on_integrity_error(e)
                except grpc.RpcError as e:
                    loop.after_pause(self._pause(loop.on_rpc_error(watch.explain(e))))
                finally:
                    stream.cancel()
        return loop.state_dict()

    def _shared_memory(self, fetch: FetchArgs) -> bool:
        """Whether this fetch goes over shared memory (saying once why not, when it was asked for)."""
        reason = shm_fallback(fetch, target(self.address))
        if reason and not self._said_fallback:
            self._said_fallback = True
            logger.info("%s: streaming chunks: %s", self.address, reason)
        return reason is None

    def _fetch_segments(
        self, fetch: FetchArgs, manifest: pb.GetManifestResponse, started: float
    ) -> dict[str, torch.Tensor] | None:
        """The state dict over shared memory; None when this server cannot (it then streams chunks)."""
        check_expert_slots(manifest, fetch.shard.model)
        request = segments_request(fetch, manifest)
        try:
            grant, all_names = self._call_meanwhile(
                f"segments of {fetch.shard.model}",
                self._stub.FetchShardSegments,
                request,
                partial(manifest_names, manifest),
            )
        except FetchError as e:
            if not shm_unsupported(e):
                raise
            logger.info("%s: streaming chunks: the server does not serve shared memory (%s)", self.address, e)
            return None
        stats = FetchStats(replica=self.address)
        self.last_fetch_stats = stats
        try:
            state = shm.receive(fetch, manifest, grant, stats, self.timeout, started, all_names)
        except RedeemError as e:  # the grant was fine: chunks carry the same bytes
            if not redeem_fallback(fetch, e, self.address, self._said_redeem):
                raise
            self._said_redeem = True
            return None
        logger.info("fetched %s over shared memory: %s", fetch.shard.model, stats.summary())
        return state

    def _pause(self, pause: Pause) -> bool:
        """Sleep the pause's floor, then wait for the channel to be ready; False if it was not in time."""
        started = time.monotonic()
        time.sleep(pause.floor)
        # A health call that waits for a ready channel, not channel_ready_future: that one's
        # polling thread outlives a channel closed meanwhile and dies with "Channel closed!".
        try:
            self._health.Check(
                health_pb2.HealthCheckRequest(),
                timeout=pause.ready_timeout(time.monotonic() - started),
                wait_for_ready=True,
            )
        except grpc.RpcError as e:
            return e.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
        return True

    def load_into(
        self, module: torch.nn.Module, model: str, rank: int = 0, world_size: int = 1, **options: Unpack[FetchOptions]
    ) -> None:
        """Fetch into an existing module's parameters and buffers, checked against the plan first.

        Every key, shape and dtype is checked against the manifest before any tensor is
        fetched, so a module that does not fit is left untouched. Tensors are written
        straight into the module's storage where device, dtype, shape and layout allow;
        the rest (another device, a non-contiguous view, a module in float32 or float16
        while the checkpoint is bfloat16) are copied in after they arrive. The module
        decides where the bytes go and as what, so device, dtype and destinations are refused.

        Raises:
            InvalidRequestError: the module's keys differ from the plan's; a tensor's shape
                differs, or its dtype differs other than between float16, bfloat16, float32
                and float64; the module has tensors on the meta device (deferred init: call
                `module.to_empty(device=...)` first), or tensors that cannot hold distinct
                values (an expand()ed buffer, views partly sharing memory).
            TypeError: `device`, `dtype` or `destinations` was given.
            FetchError: as fetch_state_dict.
        """
        load = ModuleLoad(module, model, options)
        manifest = self.get_manifest(model, rank, world_size, **options)
        into: Any = load.options(manifest, options)
        load.apply(self.fetch_state_dict(model, rank, world_size, **into))

    def fetch_files(
        self, model: str, dest: str | Path, patterns: list[str] | None = None, revision: str | None = None
    ) -> list[Path]:
        """Write the model's non-weight files (config, tokenizer) under `dest`, atomically.

        Each file appears whole or not at all; a failed call leaves no partial file behind
        (files finished before the failure stay).

        Returns:
            The files written, in the order they arrived.

        Raises:
            FetchError: the call's status (NOT_FOUND, ...; DEADLINE_EXCEEDED when the stream
                stalls past RetryPolicy.stream_idle_timeout), or DATA_LOSS when a chunk fails
                its checksum, a path is not a plain relative one inside `dest`, or the
                stream ends inside a file or before a file it listed.
        """
        writer = FileWriter(Path(dest))
        request = pb.FetchFilesRequest(model=model, revision=revision or "", patterns=patterns or [])
        call = self._stub.FetchFiles(request)
        with StallWatch(self.retry.stream_idle_timeout, lambda: writer.chunks) as watch:
            try:
                with watch.watching(call):
                    for chunk in call:
                        writer.accept(chunk)
                writer.finish()
            except grpc.RpcError as e:
                raise fetch_error(watch.explain(e), f"files of {model}") from None
            finally:
                call.cancel()  # a no-op after the end; otherwise a chunk was refused
                writer.abort()
        return writer.written

    def prefetch(
        self, model: str, world_size: int = 1, ranks: list[int] | None = None, *, wait: bool = False
    ) -> pb.PrefetchResponse:
        """Ask the server to warm a model (returns at once)."""
        request = pb.PrefetchRequest(model=model, world_size=world_size, ranks=ranks or [], wait=wait)
        response: pb.PrefetchResponse = self._call(f"prefetch {model}", self._stub.Prefetch, request)
        return response

    def evict(self, model: str) -> bool:
        """Ask the server to drop a model's open state."""
        return bool(self._call(f"evict {model}", self._stub.Evict, pb.EvictRequest(model=model)).evicted)

    # ----------------------------------------------------------------- versions

    def publish(
        self, model: str, state_dict: Mapping[str, torch.Tensor], *, base: int | None = None,
        chunk_bytes: int = versions.CHUNK_BYTES,
    ) -> int:  # fmt: skip
        """Publish a new version of a model: these tensors (checkpoint names) on top of `base`.

        Tensors not in `state_dict` stay as they are in `base` (the latest by default);
        each keeps its dtype and shape. A broken upload resumes where the server's copy
        ends, however often the stream breaks within the retry policy.

        Returns:
            The new version's number.

        Raises:
            FetchError: PERMISSION_DENIED without the token's publish scope;
                INVALID_ARGUMENT for a tensor the checkpoint lacks or of another shape;
                FAILED_PRECONDITION without --state-dir on the server.
        """
        tensors = versions.outgoing(state_dict)
        status = self._call(
            f"publish {model}", self._versions.StartPublish, versions.start_request(model, tensors, base)
        )
        attempt = 0
        while True:
            requests = versions.upload_requests(status.upload_id, tensors, status.received, chunk_bytes)
            try:
                result = self._versions.PublishVersion(requests, wait_for_ready=True)
            except grpc.RpcError as e:
                attempt += 1
                if not self.retry.should_retry(e.code(), attempt):
                    raise fetch_error(e, f"publish {model}") from None
                time.sleep(self.retry.backoff(attempt))
                status = self._call(f"publish {model}", self._versions.GetPublish,
                                    pb.GetPublishRequest(upload_id=status.upload_id))  # fmt: skip
                if status.committed:
                    return int(status.version)
                continue
            if not result.committed:  # the stream ended early without an error: go on from where it stopped
                attempt += 1
                if attempt > MAX_SHORT_UPLOADS:
                    raise FetchError(
                        f"publish {model}: the server keeps ending the upload early", grpc.StatusCode.UNAVAILABLE
                    )
                status = result
                continue
            return int(result.version)

    def list_versions(self, model: str) -> list[pb.VersionInfo]:
        """The model's versions, version 0 (the checkpoint) first."""
        request = pb.ListVersionsRequest(model=model)
        return list(self._call(f"versions of {model}", self._versions.ListVersions, request).versions)

    def watch_versions(
        self, model: str, after_version: int = 0, serving_version: int | None = None
    ) -> versions.VersionWatch:
        """Each version after `after_version` as it is published; leases `serving_version` meanwhile.

        Iterate the result for VersionInfo messages; its `close()`, from any thread, ends
        the stream and with it the lease that keeps `serving_version` from retention.
        """
        request = pb.WatchVersionsRequest(model=model, after_version=after_version, serving_version=serving_version)
        return versions.VersionWatch(self._versions.WatchVersions(request), model)

    def update(
        self,
        target: torch.nn.Module | Mapping[str, torch.Tensor],
        model: str,
        rank: int = 0,
        world_size: int = 1,
        *,
        since_version: int,
        **options: Any,
    ) -> int:
        """Bring a module's (or state dict's) tensors from `since_version` to the latest version in place.

        Only this rank's tensors whose bytes changed are fetched; the whole delta is
        received and verified (staging memory: the changed bytes) and checked against
        the targets' names, shapes and dtypes before any target is written, so a failed
        update changes nothing.

        Takes fetch_state_dict's options (version, layout, pp/ep, ...) but device, which
        the targets decide.

        Returns:
            The version the targets now hold (pass it as since_version next time).
        """
        targets = module_destinations(target) if isinstance(target, torch.nn.Module) else target
        device = next(iter(targets.values())).device if targets else torch.device("cpu")
        delta = self.fetch_state_dict(model, rank, world_size, since_version=since_version, device=device, **options)
        versions.apply_update(targets, delta, model)
        assert self.last_fetch_stats is not None
        return self.last_fetch_stats.version

    # ------------------------------------------------------------------ control

    def report_expert_load(
        self, model: str, counts: control.ExpertLoad, *, ep_rank: int | None = None, sequence: int | None = None
    ) -> int:
        """Add one worker's token counts to the model's load window.

        Args:
            model: the MoE model's name.
            counts: a [moe_layers, experts] integer tensor, numpy array or nested list
                (each count at most 2^48).
            ep_rank, sequence: identify the report (the reporting EP rank and a number that
                grows with each of its reports): a resent report is then counted once.

        Returns:
            How many reports the server's window for the model now sums.

        Raises:
            InvalidRequestError: (a ValueError) the table is not 2-D integers; nothing is sent.
            FetchError: INVALID_ARGUMENT when the shape does not match the model.
        """
        request = control.report_request(model, counts, ep_rank, sequence)
        response = self._call(f"report load of {model}", self._control.ReportExpertLoad, request)
        return int(response.reports_in_window)

    def rebalance(
        self,
        model: str,
        *,
        policy: str | None = None,
        num_replicas: int | None = None,
        num_nodes: int | None = None,
        gpus_per_node: int | None = None,
        num_groups: int | None = None,
        locality: str | None = None,
        topk_group: int | None = None,
    ) -> str:
        """Start a background rebalance from the reported load; returns its job id at once.

        Args:
            model: the MoE model's name.
            policy: "hierarchical" (the server's default), "locality-aware", "greedy",
                or another policy registered on the server.
            num_replicas: physical expert slots per layer (default: the current
                mapping's, or one per expert); must divide over the GPUs.
            num_nodes, gpus_per_node, num_groups: the topology, needed the first time
                (default: the current mapping's).
            locality: "group" (the server's default) keeps every expert group, with
                all its replicas, on one node, as node-limited routing needs;
                "relaxed" lets replicas cross nodes for balance at the cost of
                inter-node traffic.
            topk_group: groups each token is routed to (the model config's), for the
                dispatch-nodes estimate; sent with the topology.

        Raises:
            FetchError: FAILED_PRECONDITION when no load was reported, INVALID_ARGUMENT
                for a model without experts or a first rebalance without a topology.
        """
        request = control.rebalance_request(
            model,
            policy=policy,
            num_replicas=num_replicas,
            num_nodes=num_nodes,
            gpus_per_node=gpus_per_node,
            num_groups=num_groups,
            locality=locality,
            topk_group=topk_group,
        )
        return control.started_job(model, self._call(f"rebalance {model}", self._control.Rebalance, request))

    def get_rebalance(self, job_id: str, *, wait: float = 0.0) -> pb.GetRebalanceResponse:
        """A job's state and, once it succeeded, its mapping, balancedness and per-rank deltas.

        With `wait` > 0 a running job is waited for, up to that many seconds (the server
        holds the call at most 300 s): the answer comes as soon as the job ends, failed
        or not, so a caller can wait without polling.
        """
        job: pb.GetRebalanceResponse = self._call(
            f"rebalance job {job_id}", self._control.GetRebalance, control.job_request(job_id, wait), wait
        )
        return job

    def watch_mapping(
        self, model: str, after_version: int = 0, *, timeout: float | None = None
    ) -> Generator[pb.ExpertMapping, None, None]:
        """Every expert mapping of `model` newer than `after_version`, as the server publishes it.

        With after_version 0 the current mapping comes first. The stream never ends on
        its own: break out of the loop (the call is cancelled when the iterator is
        closed) or give `timeout`, the stream's deadline in seconds.

        Raises:
            FetchError: the stream failed (DEADLINE_EXCEEDED once `timeout` passes).
        """
        call = self._control.WatchExpertMapping(control.watch_request(model, after_version), timeout=timeout)
        try:
            for response in call:
                yield response.mapping
        except grpc.RpcError as e:
            raise fetch_error(e, f"watch mappings of {model}") from None
        finally:
            call.cancel()


# At the bottom, as a module: fleet.py subclasses WeightClient, which exists by now, and
# whichever of the two is imported first, the other finds what it needs.
from weightserve.client import fleet  # noqa: E402
