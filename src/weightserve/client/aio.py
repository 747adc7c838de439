"""AsyncWeightClient: the asyncio twin of WeightClient, for engines that start under an event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typing_extensions import Unpack

from weightserve.client import control, routing, shm, versions
from weightserve.client.assembly import FetchStats
from weightserve.client.call_metadata import CallMetadata, async_metadata_interceptors, is_unix, target
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
from weightserve.client.stalls import AsyncStallWatch
from weightserve.errors import FetchError, IntegrityError, RedeemError
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc


class AsyncWeightClient:
    """Same calls as WeightClient, awaitable; use `async with`.

    Args:
        address: "host:port", "unix:/path" or a bare "/path" socket.
        retry: how a broken FetchShard stream is resumed (the only call that retries).
        timeout: the deadline of each unary call, in seconds; a call waits for the
            channel to become ready within it and is not retried.
        server_name, fleet_options: as WeightClient's; a fleet address makes an
            AsyncFleetClient (client/fleet_aio.py).
    """

    def __new__(cls, address: str | Sequence[str], *args: Any, **kwargs: Any) -> AsyncWeightClient:
        """A fleet address (a list, "a:1,b:2", dns:///) makes an AsyncFleetClient (client/fleet_aio.py)."""
        if cls is AsyncWeightClient and routing.is_fleet(address):
            return super().__new__(fleet_aio.AsyncFleetClient)
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
        metadata = CallMetadata(security.metadata(), is_unix(target(address)))
        interceptors: Any = async_metadata_interceptors(metadata) if metadata else None
        credentials = security.credentials()
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(
                target(address), options=channel_options(), interceptors=interceptors
            )
        else:
            named = [("grpc.ssl_target_name_override", server_name)] if server_name else []
            self._channel = grpc.aio.secure_channel(
                target(address), credentials, options=[*channel_options(), *named], interceptors=interceptors
            )
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

    async def __aenter__(self) -> AsyncWeightClient:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    async def _call(self, action: str, method: Any, request: Any, extra_seconds: float = 0.0) -> Any:
        """See WeightClient._call."""
        try:
            return await method(request, timeout=self.timeout + extra_seconds, wait_for_ready=True)
        except grpc.RpcError as e:
            raise await self._why_not_ready(e) or fetch_error(e, action) from None

    async def _why_not_ready(self, error: grpc.RpcError) -> FetchError | None:
        """See WeightClient._why_not_ready."""
        if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            return None
        try:
            await self._health.Check(health_pb2.HealthCheckRequest(), timeout=PROBE_SECONDS)
        except grpc.RpcError as probe:
            return unreachable(self.address, probe)
        return None

    async def list_models(self) -> list[pb.ModelInfo]:
        response = await self._call("list models", self._stub.ListModels, pb.ListModelsRequest())
        return list(response.models)

    async def get_manifest(
        self, model: str, rank: int = 0, world_size: int = 1, **options: Unpack[FetchOptions]
    ) -> pb.GetManifestResponse:
        """See WeightClient.get_manifest."""
        return await self._manifest(fetch_args(model, rank, world_size, options).shard)

    async def _manifest(self, shard: ShardArgs) -> pb.GetManifestResponse:
        """See WeightClient._manifest."""
        pages = ManifestPages(shard.model, shard.proto())
        while (request := pages.next_request()) is not None:
            try:
                pages.on_page(await self._call(f"manifest of {shard.model}", self._stub.GetManifest, request))
            except FetchError as e:
                pages.on_error(e)
        return pages.result()

    async def fetch_state_dict(
        self, model: str, rank: int = 0, world_size: int = 1, **options: Unpack[FetchOptions]
    ) -> dict[str, torch.Tensor]:
        """See WeightClient.fetch_state_dict."""
        started, self.last_fetch_stats = time.monotonic(), None  # never an earlier fetch's, should this one fail
        fetch = fetch_args(model, rank, world_size, options)
        manifest = await self._manifest(fetch.shard)
        check_names(manifest, fetch.names, model)
        if self._shared_memory(fetch):
            state = await self._fetch_segments(fetch, manifest, started)
            if state is not None:
                return state
        loop = ResumeLoop(fetch, manifest, self.retry, replica=self.address, started=started)
        self.last_fetch_stats = loop.stats
        watch = loop.async_stall_watch()
        while (shard_request := loop.next_request()) is not None:
            stream = self._fetch(shard_request, wait_for_ready=loop.resuming)
            try:
                await loop.receive_async(stream, watch)
            except IntegrityError as e:
                loop.on_integrity_error(e)
            except grpc.RpcError as e:
                loop.after_pause(await self._pause(loop.on_rpc_error(e)))
            finally:
                stream.cancel()
        return loop.state_dict()

    def _shared_memory(self, fetch: FetchArgs) -> bool:
        """See WeightClient._shared_memory."""
        reason = shm_fallback(fetch, target(self.address))
        if reason and not self._said_fallback:
            self._said_fallback = True
            logger.info("%s: streaming chunks: %s", self.address, reason)
        return reason is None

    async def _fetch_segments(
        self, fetch: FetchArgs, manifest: pb.GetManifestResponse, started: float
    ) -> dict[str, torch.Tensor] | None:
        """See WeightClient._fetch_segments."""
        check_expert_slots(manifest, fetch.shard.model)
        request = segments_request(fetch, manifest)
        names = asyncio.ensure_future(asyncio.to_thread(manifest_names, manifest))  # while the server answers
        try:
            grant = await self._call(f"segments of {fetch.shard.model}", self._stub.FetchShardSegments, request)
        except BaseException as e:
            names.cancel()
            if not isinstance(e, FetchError) or not shm_unsupported(e):
                raise
            logger.info("%s: streaming chunks: the server does not serve shared memory (%s)", self.address, e)
            return None
        stats = FetchStats(replica=self.address)
        self.last_fetch_stats = stats
        all_names = await names
        try:
            receive = (fetch, manifest, grant, stats, self.timeout, started, all_names)
            state = await asyncio.to_thread(shm.receive, *receive)
        except RedeemError as e:  # the grant was fine: chunks carry the same bytes
            if not redeem_fallback(fetch, e, self.address, self._said_redeem):
                raise
            self._said_redeem = True
            return None
        logger.info("fetched %s over shared memory: %s", fetch.shard.model, stats.summary())
        return state

    async def publish(
        self, model: str, state_dict: Mapping[str, torch.Tensor], *, base: int | None = None,
        chunk_bytes: int = versions.CHUNK_BYTES,
    ) -> int:  # fmt: skip
        """See WeightClient.publish."""
        tensors = await asyncio.to_thread(versions.outgoing, state_dict)
        start = versions.start_request(model, tensors, base)
        status = await self._call(f"publish {model}", self._versions.StartPublish, start)
        attempt = 0
        while True:
            requests = versions.upload_requests(status.upload_id, tensors, status.received, chunk_bytes)
            try:
                result = await self._versions.PublishVersion(_aiter(requests), wait_for_ready=True)
            except grpc.RpcError as e:
                attempt += 1
                if not self.retry.should_retry(e.code(), attempt):
                    raise fetch_error(e, f"publish {model}") from None
                await asyncio.sleep(self.retry.backoff(attempt))
                request = pb.GetPublishRequest(upload_id=status.upload_id)
                status = await self._call(f"publish {model}", self._versions.GetPublish, request)
                if status.committed:
                    return int(status.version)
                continue
            if not result.committed:
                attempt += 1
                if attempt > 16:
                    raise FetchError(
                        f"publish {model}: the server keeps ending the upload early", grpc.StatusCode.UNAVAILABLE
                    )
                status = result
                continue
            return int(result.version)

    async def list_versions(self, model: str) -> list[pb.VersionInfo]:
        """See WeightClient.list_versions."""
        request = pb.ListVersionsRequest(model=model)
        return list((await self._call(f"versions of {model}", self._versions.ListVersions, request)).versions)

    async def watch_versions(
        self, model: str, after_version: int = 0, serving_version: int | None = None
    ) -> AsyncIterator[pb.VersionInfo]:
        """See WeightClient.watch_versions."""
        request = pb.WatchVersionsRequest(model=model, after_version=after_version, serving_version=serving_version)
        stream = self._versions.WatchVersions(request)
        try:
            async for info in stream:
                yield info
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise fetch_error(e, f"watch versions of {model}") from None
        finally:
            stream.cancel()

    async def update(
        self,
        target: torch.nn.Module | Mapping[str, torch.Tensor],
        model: str,
        rank: int = 0,
        world_size: int = 1,
        *,
        since_version: int,
        **options: Any,
    ) -> int:
        """See WeightClient.update."""
        targets = module_destinations(target) if isinstance(target, torch.nn.Module) else target
        device = next(iter(targets.values())).device if targets else torch.device("cpu")
        delta = await self.fetch_state_dict(
            model, rank, world_size, since_version=since_version, device=device, **options
        )
        versions.apply_update(targets, delta, model)
        assert self.last_fetch_stats is not None
        return self.last_fetch_stats.version

    async def _pause(self, pause: Pause) -> bool:
        """See WeightClient._pause."""
        started = time.monotonic()
        await asyncio.sleep(pause.floor)
        try:
            await asyncio.wait_for(self._channel.channel_ready(), pause.ready_timeout(time.monotonic() - started))
        except asyncio.TimeoutError:
            return False
        return True

    async def load_into(
        self, module: torch.nn.Module, model: str, rank: int = 0, world_size: int = 1, **options: Unpack[FetchOptions]
    ) -> None:
        """See WeightClient.load_into."""
        load = ModuleLoad(module, model, options)
        manifest = await self.get_manifest(model, rank, world_size, **options)
        into: Any = load.options(manifest, options)
        load.apply(await self.fetch_state_dict(model, rank, world_size, **into))

    async def fetch_files(
        self, model: str, dest: str | Path, patterns: list[str] | None = None, revision: str | None = None
    ) -> list[Path]:
        """See WeightClient.fetch_files."""
        writer = FileWriter(Path(dest))
        request = pb.FetchFilesRequest(model=model, revision=revision or "", patterns=patterns or [])
        call = self._stub.FetchFiles(request)
        watch = AsyncStallWatch(self.retry.stream_idle_timeout, lambda: writer.chunks)
        try:
            async with watch.watching(call):
                async for chunk in call:
                    writer.accept(chunk)
            writer.finish()
        except grpc.RpcError as e:
            raise fetch_error(e, f"files of {model}") from None
        finally:
            call.cancel()  # a no-op after the end; otherwise a chunk was refused
            writer.abort()
        return writer.written

    async def prefetch(
        self, model: str, world_size: int = 1, ranks: list[int] | None = None, *, wait: bool = False
    ) -> pb.PrefetchResponse:
        request = pb.PrefetchRequest(model=model, world_size=world_size, ranks=ranks or [], wait=wait)
        response: pb.PrefetchResponse = await self._call(f"prefetch {model}", self._stub.Prefetch, request)
        return response

    async def evict(self, model: str) -> bool:
        response = await self._call(f"evict {model}", self._stub.Evict, pb.EvictRequest(model=model))
        return bool(response.evicted)

    # ------------------------------------------------------------------ control

    async def report_expert_load(
        self, model: str, counts: control.ExpertLoad, *, ep_rank: int | None = None, sequence: int | None = None
    ) -> int:
        """See WeightClient.report_expert_load."""
        request = control.report_request(model, counts, ep_rank, sequence)
        response = await self._call(f"report load of {model}", self._control.ReportExpertLoad, request)
        return int(response.reports_in_window)

    async def rebalance(
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
        """See WeightClient.rebalance."""
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
        return control.started_job(model, await self._call(f"rebalance {model}", self._control.Rebalance, request))

    async def get_rebalance(self, job_id: str, *, wait: float = 0.0) -> pb.GetRebalanceResponse:
        """See WeightClient.get_rebalance."""
        job: pb.GetRebalanceResponse = await self._call(
            f"rebalance job {job_id}", self._control.GetRebalance, control.job_request(job_id, wait), wait
        )
        return job

    async def watch_mapping(
        self, model: str, after_version: int = 0, *, timeout: float | None = None
    ) -> AsyncGenerator[pb.ExpertMapping, None]:
        """See WeightClient.watch_mapping; close it with `contextlib.aclosing` to end the call early."""
        call = self._control.WatchExpertMapping(control.watch_request(model, after_version), timeout=timeout)
        try:
            async for response in call:
                yield response.mapping
        except grpc.RpcError as e:
            raise fetch_error(e, f"watch mappings of {model}") from None
        finally:
            call.cancel()


async def _aiter(items: Iterable[Any]) -> AsyncIterator[Any]:
    """An async iterator over a plain one (a grpc.aio request stream)."""
    for item in items:
        yield item


# At the bottom, as a module: fleet_aio.py subclasses AsyncWeightClient (see the end of sync.py).
from weightserve.client import fleet_aio  # noqa: E402
