"""AsyncFleetClient: the asyncio twin of FleetClient (client/fleet.py says how routing and failover work).

`AsyncWeightClient(["a:1", "b:2"])` or `AsyncWeightClient("dns:///name:port")` returns
one. Routing state (endpoints, health, rendezvous orders) is the same `Router`; each
replica has its own single-address AsyncWeightClient.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch
from grpc_health.v1 import health_pb2
from typing_extensions import Unpack

from weightserve.client import control
from weightserve.client.aio import AsyncWeightClient
from weightserve.client.common import FetchArgs, FetchOptions, Pause, ResumeLoop, ShardArgs, fetch_args, logger
from weightserve.client.fleet import FAILOVER_CODES, FleetRouting, check_full_share, full_share_args
from weightserve.client.modules import check_names
from weightserve.client.retry import RetryPolicy
from weightserve.client.security import Pem
from weightserve.errors import FetchError, IntegrityError
from weightserve.v1 import weightserve_pb2 as pb

T = TypeVar("T")


class AsyncFleetClient(FleetRouting, AsyncWeightClient):
    """AsyncWeightClient's calls over a fleet of replicas; the arguments are FleetClient's."""

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
        replicas_per_model: int = 2,
        spread_key: str | None = None,
        refresh_seconds: float = 30.0,
        connect_timeout: float = 3.0,
        cooldown: float = 5.0,
    ) -> None:
        self._setup_fleet(
            address, retry=retry, timeout=timeout, connect_timeout=connect_timeout, server_name=server_name,
            replicas_per_model=replicas_per_model, spread_key=spread_key, refresh_seconds=refresh_seconds,
            cooldown=cooldown, token=token, tls=tls, root_certificates=root_certificates,
            certificate_chain=certificate_chain, private_key=private_key, allow_insecure_token=allow_insecure_token,
        )  # fmt: skip
        self._replicas: dict[str, AsyncWeightClient] = {}

    # ------------------------------------------------------------------ plumbing

    def replica(self, endpoint: str) -> AsyncWeightClient:
        """The single-address client of one replica (made on first use, kept until close)."""
        client = self._replicas.get(endpoint)
        if client is None:
            client = self._replicas[endpoint] = AsyncWeightClient(endpoint, **self._options)
        return client

    async def __aenter__(self) -> AsyncFleetClient:
        return self

    async def close(self) -> None:
        replicas, self._replicas = list(self._replicas.values()), {}
        for client in replicas:
            await client.close()

    async def _ready(self, endpoint: str, wait: float | None = None) -> bool:
        """See FleetClient._ready."""
        try:
            answer = await self.replica(endpoint)._health.Check(
                health_pb2.HealthCheckRequest(),
                timeout=self.connect_timeout if wait is None else wait,
                wait_for_ready=True,
            )
        except grpc.RpcError:
            self.health.mark_down(endpoint)
            return False
        if answer.status != health_pb2.HealthCheckResponse.SERVING:
            self.health.mark_down(endpoint)
            return False
        return True

    async def _first(
        self, order: Sequence[str], action: str, call: Callable[[AsyncWeightClient], Awaitable[T]]
    ) -> tuple[T, str]:
        """See FleetClient._first."""
        last: FetchError | None = None
        for endpoint in self.health.live_first(order):
            if not self.health.recently_up(endpoint) and not await self._ready(endpoint):
                last = FetchError(f"{action}: cannot reach {endpoint}", grpc.StatusCode.UNAVAILABLE)
                continue
            try:
                result = await call(self.replica(endpoint))
            except FetchError as e:
                if e.code() not in FAILOVER_CODES:
                    raise
                self.health.mark_down(endpoint)
                logger.warning("%s on %s failed (%s); trying the next replica", action, endpoint, e)
                last = e
                continue
            self.health.mark_up(endpoint)
            return result, endpoint
        raise last or FetchError(f"{action}: the fleet {self.address} has no replicas", grpc.StatusCode.UNAVAILABLE)

    async def _on_owner(self, model: str, action: str, call: Callable[[AsyncWeightClient], Awaitable[T]]) -> T:
        return (await self._first(self.owner_order(model), f"{action} {model}", call))[0]

    # ------------------------------------------------------------------ fetches

    async def get_manifest(
        self, model: str, rank: int = 0, world_size: int = 1, **options: Unpack[FetchOptions]
    ) -> pb.GetManifestResponse:
        shard = fetch_args(model, rank, world_size, options).shard
        return (await self._first(self.fetch_order(shard), f"manifest of {model}", lambda c: c._manifest(shard)))[0]

    async def fetch_state_dict(
        self, model: str, rank: int = 0, world_size: int = 1, **options: Unpack[FetchOptions]
    ) -> dict[str, torch.Tensor]:
        """See FleetClient.fetch_state_dict."""
        started, self.last_fetch_stats = time.monotonic(), None
        fetch = fetch_args(model, rank, world_size, options)
        order = self.fetch_order(fetch.shard)
        manifest, endpoint = await self._first(order, f"manifest of {model}", lambda c: c._manifest(fetch.shard))
        check_names(manifest, fetch.names, model)
        return await self._stream(fetch, manifest, order, endpoint, started)

    async def _stream(
        self, fetch: FetchArgs, manifest: pb.GetManifestResponse, order: list[str], endpoint: str, started: float
    ) -> dict[str, torch.Tensor]:
        loop = ResumeLoop(fetch, manifest, self.retry, replica=endpoint, started=started)
        self.last_fetch_stats = loop.stats
        failed: set[str] = set()
        watch = loop.async_stall_watch()
        while (request := loop.next_request()) is not None:
            before = loop.stats.payload_bytes
            stream = self.replica(endpoint)._fetch(request, wait_for_ready=False)
            try:
                await loop.receive_async(stream, watch)
            except IntegrityError as e:
                loop.on_integrity_error(e)
            except grpc.RpcError as e:
                delta = fetch.shard.since_mapping is not None or fetch.shard.since_version is not None
                if e.code() == grpc.StatusCode.FAILED_PRECONDITION and delta and endpoint != order[0]:
                    return await self._full_share(fetch, endpoint, order, started)
                pause = loop.on_rpc_error(e)
                self.health.mark_down(endpoint)
                if loop.stats.payload_bytes > before:
                    failed.clear()
                failed.add(endpoint)
                endpoint = await self._next(order, failed, loop, pause, endpoint, e)
            finally:
                stream.cancel()
        self.health.mark_up(endpoint)
        return loop.state_dict()

    async def _next(
        self, order: list[str], failed: set[str], loop: ResumeLoop, pause: Pause, endpoint: str, error: grpc.RpcError
    ) -> str:
        """See FleetClient._next."""
        untried = [e for e in self.health.live_first(order) if e not in failed]
        if untried:
            logger.warning(
                "fetch %s: %s failed (%s); resuming on %s", loop.args.model, endpoint, error.code().name, untried[0]
            )
            loop.after_pause(True)
            loop.stats.replica = untried[0]
            return untried[0]
        waited_from = time.monotonic()
        await asyncio.sleep(pause.floor)
        while True:
            for candidate in order:
                if await self._ready(candidate, wait=0.2):
                    loop.after_pause(True)
                    failed.clear()
                    loop.stats.replica = candidate
                    return candidate
            if time.monotonic() - waited_from >= pause.limit:
                loop.after_pause(False)

    async def _full_share(
        self, fetch: FetchArgs, endpoint: str, order: list[str], started: float
    ) -> dict[str, torch.Tensor]:
        """See FleetClient._full_share."""
        full = full_share_args(fetch, endpoint)
        manifest = await self.replica(endpoint)._manifest(full.shard)
        check_full_share(manifest, fetch, endpoint)
        rest = [endpoint, *(e for e in order if e != endpoint)]
        return await self._stream(full, manifest, rest, endpoint, started)

    # ------------------------------------------------------------------ the rest of AsyncWeightClient

    async def list_models(self) -> list[pb.ModelInfo]:
        return (await self._first(sorted(self.endpoints()), "list models", lambda c: c.list_models()))[0]

    async def fetch_files(
        self, model: str, dest: str | Path, patterns: list[str] | None = None, revision: str | None = None
    ) -> list[Path]:
        order = self.fetch_order(ShardArgs(model))
        return (
            await self._first(order, f"files of {model}", lambda c: c.fetch_files(model, dest, patterns, revision))
        )[0]

    async def prefetch(
        self, model: str, world_size: int = 1, ranks: list[int] | None = None, *, wait: bool = False
    ) -> pb.PrefetchResponse:
        """See FleetClient.prefetch."""
        answers = []
        for endpoint in self.owner_order(model)[: self.replicas_per_model]:
            try:
                answer, _ = await self._first(
                    [endpoint], f"prefetch {model}", lambda c: c.prefetch(model, world_size, ranks, wait=wait)
                )
                answers.append(answer)
            except FetchError as e:
                if e.code() not in FAILOVER_CODES:
                    raise
                logger.warning("prefetch %s: skipping %s: %s", model, endpoint, e)
        if not answers:
            raise FetchError(f"prefetch {model}: no replica of {self.address} answered", grpc.StatusCode.UNAVAILABLE)
        return answers[0]

    async def evict(self, model: str) -> bool:
        evicted = False
        for endpoint in self.endpoints():
            try:
                evicted |= (await self._first([endpoint], f"evict {model}", lambda c: c.evict(model)))[0]
            except FetchError as e:
                if e.code() not in FAILOVER_CODES:
                    raise
        return evicted

    async def publish(
        self, model: str, state_dict: Mapping[str, torch.Tensor], *, base: int | None = None, **kwargs: Any
    ) -> int:
        return await self._on_owner(model, "publish", lambda c: c.publish(model, state_dict, base=base, **kwargs))

    async def list_versions(self, model: str) -> list[pb.VersionInfo]:
        return await self._on_owner(model, "versions of", lambda c: c.list_versions(model))

    async def watch_versions(
        self, model: str, after_version: int = 0, serving_version: int | None = None
    ) -> AsyncIterator[pb.VersionInfo]:
        async for info in self.replica(self.owner_order(model)[0]).watch_versions(
            model, after_version, serving_version
        ):
            yield info

    async def report_expert_load(
        self, model: str, counts: control.ExpertLoad, *, ep_rank: int | None = None, sequence: int | None = None
    ) -> int:
        return await self._on_owner(
            model, "report load of", lambda c: c.report_expert_load(model, counts, ep_rank=ep_rank, sequence=sequence)
        )

    async def rebalance(self, model: str, **kwargs: Any) -> str:
        job = await self._on_owner(model, "rebalance", lambda c: c.rebalance(model, **kwargs))
        self._jobs[job] = model
        return job

    async def get_rebalance(self, job_id: str, *, wait: float = 0.0) -> pb.GetRebalanceResponse:
        model = self._jobs.get(job_id)
        order = self.owner_order(model) if model else sorted(self.endpoints())
        last: FetchError | None = None
        for endpoint in order:
            try:
                job, _ = await self._first(
                    [endpoint], f"rebalance job {job_id}", lambda c: c.get_rebalance(job_id, wait=wait)
                )
                return job
            except FetchError as e:
                if e.code() not in {*FAILOVER_CODES, grpc.StatusCode.NOT_FOUND}:
                    raise
                last = e
        assert last is not None
        raise last

    async def watch_mapping(
        self, model: str, after_version: int = 0, *, timeout: float | None = None
    ) -> AsyncGenerator[pb.ExpertMapping, None]:
        async for mapping in self.replica(self.owner_order(model)[0]).watch_mapping(
            model, after_version, timeout=timeout
        ):
            yield mapping
