"""AsyncWeightClient: the asyncio twin of WeightClient, for engines that start under an event loop."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import torch

from weightserve.client.assembly import FetchStats
from weightserve.client.common import FETCH_SHARD, ResumeLoop, ShardArgs, channel_options, fetch_error, target
from weightserve.client.files import FileWriter
from weightserve.client.retry import RetryPolicy
from weightserve.errors import IntegrityError
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc


class AsyncWeightClient:
    """Same calls as WeightClient, awaitable; use `async with`."""

    def __init__(self, address: str, *, retry: RetryPolicy | None = None) -> None:
        self.address = address
        self.retry = retry or RetryPolicy()
        self._channel = grpc.aio.insecure_channel(target(address), options=channel_options())
        self._stub = pb_grpc.WeightServiceStub(self._channel)
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

    async def _call(self, action: str, method: Any, request: Any) -> Any:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await method(request)
            except grpc.RpcError as e:
                if not self.retry.should_retry(e.code(), attempt):
                    raise fetch_error(e, action) from None
                await asyncio.sleep(self.retry.backoff(attempt))

    async def list_models(self) -> list[pb.ModelInfo]:
        response = await self._call("list models", self._stub.ListModels, pb.ListModelsRequest())
        return list(response.models)

    async def get_manifest(
        self, model: str, *, rank: int = 0, world_size: int = 1, **kw: Any
    ) -> pb.GetManifestResponse:
        args = ShardArgs(model, rank, world_size, **kw)
        manifest: pb.GetManifestResponse = await self._call(
            f"manifest of {model}", self._stub.GetManifest, pb.GetManifestRequest(shard=args.proto())
        )
        return manifest

    async def fetch_state_dict(
        self,
        model: str,
        rank: int = 0,
        world_size: int = 1,
        names: list[str] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        revision: str | None = None,
        *,
        format: str | None = None,
        layout: str = "checkpoint",
        pp_rank: int = 0,
        pp_size: int = 1,
        ep_rank: int = 0,
        ep_size: int = 0,
        since_mapping: int | None = None,
        destinations: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """See WeightClient.fetch_state_dict."""
        args = ShardArgs(
            model,
            rank,
            world_size,
            revision,
            format,
            layout,
            pp_rank,
            pp_size,
            ep_rank,
            ep_size,
            since_mapping,
        )
        manifest = await self._call(
            f"manifest of {model}", self._stub.GetManifest, pb.GetManifestRequest(shard=args.proto())
        )
        loop = ResumeLoop(args, manifest, names, torch.device(device), self.retry, destinations)
        self.last_stats = loop.stats
        while (request := loop.next_request()) is not None:
            stream = self._fetch(request)
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
        return loop.session.state_dict(dtype)

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
