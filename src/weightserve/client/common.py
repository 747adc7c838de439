"""What the sync and asyncio clients share: channel options, requests, the resume loop's decisions."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import grpc
import torch
from tqdm import tqdm

from weightserve.client.assembly import FetchSession
from weightserve.client.retry import RetryPolicy
from weightserve.errors import FetchError, IntegrityError
from weightserve.v1 import weightserve_pb2 as pb

FETCH_SHARD = "/weightserve.v1.WeightService/FetchShard"

MANIFEST_ARGS = (
    "rank",
    "world_size",
    "revision",
    "format",
    "layout",
    "pp_rank",
    "pp_size",
    "ep_rank",
    "ep_size",
    "since_mapping",
)
"""fetch_state_dict arguments that also pick the manifest."""

LAYOUTS = {"checkpoint": pb.LAYOUT_CHECKPOINT, "vllm": pb.LAYOUT_VLLM}


def channel_options() -> list[tuple[str, int]]:
    """Keepalive so a dead server is noticed mid-stream; quick reconnects after a restart."""
    return [
        ("grpc.max_receive_message_length", 8 * 1024 * 1024),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]


def target(address: str) -> str:
    """A gRPC target from 'host:port', 'unix:/path' or a bare '/path' socket."""
    return f"unix:{address}" if address.startswith("/") else address


@dataclass(frozen=True)
class ShardArgs:
    """The arguments of fetch_state_dict that pick a plan."""

    model: str
    rank: int = 0
    world_size: int = 1
    revision: str | None = None
    format: str | None = None
    layout: str = "checkpoint"
    pp_rank: int = 0
    pp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 0
    since_mapping: int | None = None

    def proto(self, revision: str | None = None) -> pb.ShardSpec:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {self.layout!r} is not one of {sorted(LAYOUTS)}")
        return pb.ShardSpec(
            model=self.model,
            revision=revision or self.revision or "",
            format=self.format or "",
            rank=self.rank,
            world_size=self.world_size,
            layout=LAYOUTS[self.layout],
            pp_rank=self.pp_rank,
            pp_size=self.pp_size,
            ep_rank=self.ep_rank,
            ep_size=self.ep_size,
            since_mapping=self.since_mapping,
        )


def fetch_error(error: grpc.RpcError, action: str) -> FetchError:
    """A FetchError carrying the status of a failed call."""
    code = error.code()
    return FetchError(f"{action}: {code.name}: {error.details()}", code)


def progress_bar(total: int, desc: str) -> tqdm:
    """A byte progress bar on a terminal, silent otherwise."""
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not sys.stderr.isatty(), leave=False)


class ResumeLoop:
    """Decides, stream after stream, what to request and whether to go on."""

    def __init__(
        self,
        args: ShardArgs,
        manifest: pb.GetManifestResponse,
        names: list[str] | None,
        device: torch.device,
        policy: RetryPolicy,
        destinations: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.args = args
        self.manifest = manifest
        self.names = list(names) if names else []
        self.policy = policy
        wanted = set(self.names) or None
        total = sum(t.nbytes for t in manifest.tensors if wanted is None or t.name in wanted)
        self.bar = progress_bar(total, args.model)
        self.session = FetchSession(manifest, names, device, on_bytes=self.bar.update, destinations=destinations)
        self.attempt = 0
        self._integrity_failures = 0

    @property
    def stats(self):  # type: ignore[no-untyped-def]
        return self.session.stats

    def next_request(self) -> pb.FetchShardRequest | None:
        """The request for the next stream, or None when everything has arrived."""
        if self.session.complete:
            self.bar.close()
            return None
        self.attempt += 1
        self.session.stats.attempts = self.attempt
        request = pb.FetchShardRequest(
            shard=self.args.proto(self.manifest.revision),
            names=self.names,
            manifest_id=self.manifest.manifest_id,
        )
        point = self.session.resume_point()
        if point is not None:
            request.resume_from.tensor, request.resume_from.offset = point
        return request

    def on_message(self, message: bytes) -> None:
        stats = self.session.stats
        stats.bytes_received += len(message)
        if stats.reconnects:
            stats.bytes_after_reconnect += len(message)
        self.session.accept(message)

    def on_stream_end(self) -> None:
        if not self.session.complete:
            raise IntegrityError("stream ended before the last tensor")

    def on_integrity_error(self, error: IntegrityError) -> None:
        """Resume at once from the last verified byte, a bounded number of times."""
        self._integrity_failures += 1
        self.session.stats.integrity_retries = self._integrity_failures
        if self._integrity_failures > self.policy.integrity_retries:
            self.bar.close()
            raise FetchError(
                f"fetch {self.args.model}: DATA_LOSS: {error} ({self._integrity_failures} checksum failures)",
                grpc.StatusCode.DATA_LOSS,
            ) from error

    def on_rpc_error(self, error: grpc.RpcError) -> float:
        """Seconds to wait before resuming; raises FetchError when not worth retrying."""
        if not self.policy.should_retry(error.code(), self.attempt):
            self.bar.close()
            raise fetch_error(error, f"fetch {self.args.model} (attempt {self.attempt})") from None
        self.session.stats.reconnects += 1
        return self.policy.backoff(self.attempt)
