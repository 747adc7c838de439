"""WeightClient: the blocking client an inference worker calls at start-up."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import torch

from weightserve.client.assembly import FetchStats
from weightserve.client.common import (
    FETCH_SHARD,
    MANIFEST_ARGS,
    ResumeLoop,
    ShardArgs,
    channel_options,
    fetch_error,
    target,
)
from weightserve.client.files import FileWriter
from weightserve.client.modules import check_keys, module_destinations
from weightserve.client.retry import RetryPolicy
from weightserve.errors import IntegrityError
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc


class WeightClient:
    """Fetches state dicts, files and model lists from a weightserve server.

    Example:
        >>> with WeightClient("weights:50051") as client:  # doctest: +SKIP
        ...     sd = client.fetch_state_dict("org/llama-7b", device="cuda")
    """

    def __init__(self, address: str, *, retry: RetryPolicy | None = None) -> None:
        self.address = address
        self.retry = retry or RetryPolicy()
        self._channel = grpc.insecure_channel(target(address), options=channel_options())
        self._stub = pb_grpc.WeightServiceStub(self._channel)
        self._fetch = self._channel.unary_stream(
            FETCH_SHARD, request_serializer=pb.FetchShardRequest.SerializeToString, response_deserializer=None
        )
        self.last_stats: FetchStats | None = None

    def __enter__(self) -> WeightClient:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, action: str, method: Any, request: Any) -> Any:
        """A unary call, retried with backoff while the server is unavailable."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return method(request)
            except grpc.RpcError as e:
                if not self.retry.should_retry(e.code(), attempt):
                    raise fetch_error(e, action) from None
                time.sleep(self.retry.backoff(attempt))

    def list_models(self) -> list[pb.ModelInfo]:
        """Every model the server can serve."""
        return list(self._call("list models", self._stub.ListModels, pb.ListModelsRequest()).models)

    def get_manifest(self, model: str, *, rank: int = 0, world_size: int = 1, **kw: Any) -> pb.GetManifestResponse:
        """One rank's plan: names, shapes, dtypes, sizes, digests and the manifest id."""
        args = ShardArgs(model, rank, world_size, **kw)
        manifest: pb.GetManifestResponse = self._call(
            f"manifest of {model}", self._stub.GetManifest, pb.GetManifestRequest(shard=args.proto())
        )
        return manifest

    def fetch_state_dict(
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
        """This rank's tensors, verified, resuming across broken streams.

        Args:
            model: the model name ("org/llama-7b").
            rank, world_size: the tensor-parallel coordinates.
            names: only these tensors (default: all of the rank's).
            device: where the tensors are allocated ("cpu", "cuda:0", ...).
            dtype: convert floating tensors to this dtype after they arrive.
            revision: pin a revision (all ranks of one job should pin the same one).
            format: a loader name, when the model directory has several formats.
            layout: "checkpoint" (the checkpoint's names, sliced) or "vllm" (the
                tensors vLLM's parallel layers hold: fused qkv/gate_up, padded vocab).
            pp_rank, pp_size: the pipeline stage; its decoder layers only.
            ep_rank, ep_size: the expert-parallel rank: the experts it holds under the
                server's current mapping, whole, named by local slot (the manifest's
                `experts` maps slots to experts); other tensors TP-sliced.
            since_mapping: with ep_size, only the experts this rank did not hold at
                that mapping version.
            destinations: tensors to write into instead of allocating (see load_into).

        Raises:
            FetchError: `.code()` is the grpc.StatusCode (NOT_FOUND, INVALID_ARGUMENT,
                FAILED_PRECONDITION when the model changed mid-fetch, DATA_LOSS, ...).
        """
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
        manifest = self._call(f"manifest of {model}", self._stub.GetManifest, pb.GetManifestRequest(shard=args.proto()))
        loop = ResumeLoop(args, manifest, names, torch.device(device), self.retry, destinations)
        self.last_stats = loop.stats
        while (request := loop.next_request()) is not None:
            stream = self._fetch(request)
            try:
                for message in stream:
                    loop.on_message(message)
                loop.on_stream_end()
            except IntegrityError as e:
                loop.on_integrity_error(e)
            except grpc.RpcError as e:
                time.sleep(loop.on_rpc_error(e))
            finally:
                stream.cancel()
        return loop.session.state_dict(dtype)

    def load_into(self, module: torch.nn.Module, model: str, **kwargs: Any) -> None:
        """Fetch into an existing module's parameters and buffers, with strict key checks.

        Tensors are written straight into the module's storage where dtype, shape and
        device match; anything else is copied in after it arrives.

        Raises:
            InvalidRequestError: the module's keys differ from the fetched plan's.
        """
        manifest = self.get_manifest(model, **{k: v for k, v in kwargs.items() if k in MANIFEST_ARGS})
        targets = module_destinations(module)
        check_keys(targets, [t.name for t in manifest.tensors], model)
        device = next(iter(targets.values())).device if targets else torch.device("cpu")
        state = self.fetch_state_dict(model, device=device, destinations=targets, **kwargs)
        with torch.no_grad():
            for name, tensor in state.items():
                if tensor is not targets[name]:
                    targets[name].copy_(tensor)

    def fetch_files(
        self, model: str, dest: str | Path, patterns: list[str] | None = None, revision: str | None = None
    ) -> list[Path]:
        """Write the model's non-weight files (config, tokenizer) under `dest`, atomically."""
        writer = FileWriter(Path(dest))
        request = pb.FetchFilesRequest(model=model, revision=revision or "", patterns=patterns or [])
        try:
            for chunk in self._stream_files(request):
                writer.accept(chunk)
        finally:
            writer.abort()
        return writer.written

    def _stream_files(self, request: pb.FetchFilesRequest) -> Iterator[pb.FileChunk]:
        try:
            yield from self._stub.FetchFiles(request)
        except grpc.RpcError as e:
            raise fetch_error(e, f"files of {request.model}") from None

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
