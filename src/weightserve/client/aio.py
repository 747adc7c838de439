"""AsyncWeightClient: the asyncio twin of WeightClient, for engines that start under an event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import torch
from typing_extensions import Unpack

from weightserve.client import control
from weightserve.client.assembly import FetchStats
from weightserve.client.common import (
    FETCH_SHARD,
    FetchOptions,
    ResumeLoop,
    channel_options,
    fetch_args,
    fetch_error,
    target,
)
from weightserve.client.files import FileWriter
from weightserve.client.retry import RetryPolicy
from weightserve.errors import IntegrityError
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc


class AsyncWeightClient:
    """Same calls as WeightClient, awaitable; use `async with`.

    Args:
        address: "host:port", "unix:/path" or a bare "/path" socket.
        retry: how a broken FetchShard stream is resumed (the only call that retries).
        timeout: the deadline of each unary call, in seconds; a call waits for the
            channel to become ready within it and is not retried.
    """

    def __init__(self, address: str, *, retry: RetryPolicy | None = None, timeout: float = 60.0) -> None:
        self.address = address
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(target(address), options=channel_options())
        self._stub = pb_grpc.WeightServiceStub(self._channel)
        self._control = pb_grpc.ControlServiceStub(self._channel)
        self._fetch = self._channel.unary_stream(
            FETCH_SHARD, request_serializer=pb.FetchShardRequest.SerializeToString, response_deserializer=None
        )
        self.last_stats: FetchStats | None = None

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
            raise fetch_error(e, action) from None

    async def list_models(self) -> list[pb.ModelInfo]:
        response = await self._call("list models", self._stub.ListModels, pb.ListModelsRequest())
        return list(response.models)

    async def get_manifest(
        self, model: str, rank: int = 0, world_size: int = 1, **options: Unpack[FetchOptions]
    ) -> pb.GetManifestResponse:
        """See WeightClient.get_manifest."""
        shard = fetch_args(model, rank, world_size, options).shard
        manifest: pb.GetManifestResponse = await self._call(
            f"manifest of {model}", self._stub.GetManifest, pb.GetManifestRequest(shard=shard.proto())
        )
        return manifest

    async def fetch_state_dict(
        self, model: str, rank: int = 0, world_size: int = 1, **options: Unpack[FetchOptions]
    ) -> dict[str, torch.Tensor]:
        """See WeightClient.fetch_state_dict."""
        fetch = fetch_args(model, rank, world_size, options)
        request = pb.GetManifestRequest(shard=fetch.shard.proto())
        manifest = await self._call(f"manifest of {model}", self._stub.GetManifest, request)
        loop = ResumeLoop(fetch, manifest, self.retry)
        self.last_stats = loop.stats
        while (shard_request := loop.next_request()) is not None:
            stream = self._fetch(shard_request)
            try:
                async for message in stream:
                    loop.on_message(message)
                loop.on_stream_end()
            except IntegrityError as e:
                loop.on_integrity_error(e)
            except grpc.RpcError as e:
                await asyncio.sleep(loop.on_rpc_error(e))
            finally:
                stream.cancel()
        return loop.state_dict()

    async def fetch_files(
        self, model: str, dest: str | Path, patterns: list[str] | None = None, revision: str | None = None
    ) -> list[Path]:
        """See WeightClient.fetch_files."""
        writer = FileWriter(Path(dest))
        request = pb.FetchFilesRequest(model=model, revision=revision or "", patterns=patterns or [])
        try:
            async for chunk in self._stub.FetchFiles(request):
                writer.accept(chunk)
        except grpc.RpcError as e:
            raise fetch_error(e, f"files of {model}") from None
        finally:
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

    async def report_expert_load(self, model: str, counts: control.ExpertLoad) -> int:
        """See WeightClient.report_expert_load."""
        request = control.report_request(model, counts)
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
    ) -> str:
        """See WeightClient.rebalance."""
        request = control.rebalance_request(
            model,
            policy=policy,
            num_replicas=num_replicas,
            num_nodes=num_nodes,
            gpus_per_node=gpus_per_node,
            num_groups=num_groups,
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
