"""What the sync and asyncio clients share: channel options, fetch arguments, the resume loop's decisions."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass, fields
from typing import Any

import grpc
import torch
from tqdm import tqdm
from typing_extensions import TypedDict

from weightserve.client.assembly import FetchSession, FetchStats
from weightserve.client.call_metadata import is_unix
from weightserve.client.expert_slots import check_expert_slots
from weightserve.client.manifest_pages import check_plan
from weightserve.client.retry import RetryPolicy, retry_after
from weightserve.client.stalls import AsyncStallWatch, StallWatch
from weightserve.errors import FetchError, IntegrityError, InvalidRequestError, RedeemError
from weightserve.v1 import weightserve_pb2 as pb

logger = logging.getLogger("weightserve.client")
"""The package's logger, named as users configure it: one INFO line per finished fetch."""

FETCH_SHARD = "/weightserve.v1.WeightService/FetchShard"

LAYOUTS = {"checkpoint": pb.LAYOUT_CHECKPOINT, "vllm": pb.LAYOUT_VLLM}


RECEIVE_WINDOW = 8 << 20
"""Bytes the server may send before the client acknowledges (HTTP/2 flow control), from the first call.

gRPC starts a fresh channel at 64 KiB and grows it by probing, so a new worker's first
large message (the 350 KB manifest of 10,000 tensors) took several round trips: 9-16 ms
on a fresh channel against 5-6 ms with the window open from the start.
"""


def channel_options() -> list[tuple[str, int]]:
    """Keepalive so a dead server is noticed mid-stream; quick reconnects after a restart; a wide receive window."""
    return [
        ("grpc.max_receive_message_length", 8 * 1024 * 1024),
        ("grpc.http2.lookahead_bytes", RECEIVE_WINDOW),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]


@dataclass(frozen=True)
class ShardArgs:
    """The arguments of fetch_state_dict that pick a plan (and so the manifest)."""

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
    num_redundant_experts: int = 0
    since_mapping: int | None = None
    version: int | None = None
    since_version: int | None = None

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
            num_redundant_experts=self.num_redundant_experts,
            since_mapping=self.since_mapping,
            version=self.version,
            since_version=self.since_version,
        )


class FetchOptions(TypedDict, total=False):
    """The keyword-only options of fetch_state_dict, get_manifest and load_into.

    Declared once so the sync and asyncio clients cannot drift apart; `fetch_args`
    documents what each one means.
    """

    names: list[str] | None
    device: str | torch.device
    dtype: torch.dtype | None
    revision: str | None
    format: str | None
    layout: str
    pp_rank: int
    pp_size: int
    ep_rank: int
    ep_size: int
    num_redundant_experts: int
    since_mapping: int | None
    version: int | None
    since_version: int | None
    destinations: dict[str, torch.Tensor] | None
    transport: str
    copy: bool
    verify: bool


_SHARD_OPTIONS = frozenset(f.name for f in fields(ShardArgs)) - {"model", "rank", "world_size"}


@dataclass(frozen=True)
class FetchArgs:
    """One fetch, unpacked: the plan it asks for and what the client does with the bytes."""

    shard: ShardArgs
    names: list[str] | None
    device: torch.device
    dtype: torch.dtype | None
    destinations: dict[str, torch.Tensor] | None
    transport: str = "auto"
    copy: bool = False
    verify: bool = False


TRANSPORTS = ("auto", "shm", "grpc", "packed")


def fetch_args(model: str, rank: int, world_size: int, options: FetchOptions) -> FetchArgs:
    """Turn fetch_state_dict's arguments into the plan request and the assembly settings.

    Args:
        model: the model name ("org/llama-7b", "hf://org/name@rev", "s3://bucket/prefix").
        rank: the tensor-parallel rank, 0 <= rank < world_size.
        world_size: the tensor-parallel size.
        options: the keyword-only options (FetchOptions), each optional:

            - names: only these tensors (default: all of the rank's).
            - device: where the tensors are allocated ("cpu" by default, "cuda:0", ...).
            - dtype: convert floating tensors to this dtype after they arrive.
            - revision: pin a revision (all ranks of one job should pin the same one).
            - format: a loader name, when the model directory has several formats.
            - layout: "checkpoint" (the checkpoint's names, sliced; the default) or
              "vllm" (the tensors vLLM's parallel layers hold: fused qkv/gate_up,
              padded vocab).
            - pp_rank, pp_size: the pipeline stage; its decoder layers only.
            - ep_rank, ep_size: the expert-parallel rank: the experts it holds under
              the server's current mapping, whole, named by local slot (the
              manifest's `experts` maps slots to experts); other tensors TP-sliced.
            - num_redundant_experts: with ep_size, the extra slots the engine starts
              with; it shapes version 0 (the start placement), so a worker passes the
              same number with since_mapping=0.
            - since_mapping: with ep_size, only the experts this rank did not hold at
              that mapping version.
            - version: a published version of the weights (0: the checkpoint under
              the root); the latest by default, pinned for the whole fetch.
            - since_version: only the tensors whose bytes for this rank differ from that
              version's (what `update` applies in place).
            - destinations: tensors to write into instead of allocating (load_into
              passes a module's parameters).
            - transport: "auto" (the default: shared memory over a Unix socket to the
              server, packed gRPC chunks otherwise), "shm", "grpc" (chunks, each
              tensor in messages of its own) or "packed" (chunks, with small whole
              tensors several to a message; a server too old for it gets plain
              chunks). Shared memory asked for over TCP falls back to packed chunks,
              saying why once.
            - copy: with shared memory, copy each tensor once into storage of its own
              instead of viewing the server's segments (the default keeps views).
            - verify: with shared memory, check every tensor's crc32c (chunks are always
              checked as they arrive).

    Returns:
        The plan's ShardArgs and the names, device, dtype and destinations the resume
        loop needs.

    Raises:
        TypeError: an option this function does not know (a misspelt keyword).
        FetchError: FAILED_PRECONDITION for a CUDA device this process cannot use (a
            torch without CUDA, no GPU visible), before anything is asked of the server.
    """
    unknown = set(options) - FetchOptions.__optional_keys__
    if unknown:
        have = ", ".join(sorted(FetchOptions.__optional_keys__))
        raise TypeError(f"unexpected fetch option(s) {', '.join(sorted(unknown))}; the options are {have}")
    picked: dict[str, Any] = {key: value for key, value in options.items() if key in _SHARD_OPTIONS}
    device = torch.device(options.get("device", "cpu"))
    check_device(device, model)
    transport = options.get("transport", "auto")
    if transport not in TRANSPORTS:
        raise InvalidRequestError(f"transport {transport!r} must be one of {', '.join(TRANSPORTS)}")
    return FetchArgs(
        shard=ShardArgs(model, rank, world_size, **picked),
        names=options.get("names"),
        device=device,
        dtype=options.get("dtype"),
        destinations=options.get("destinations"),
        transport=transport,
        copy=bool(options.get("copy", False)),
        verify=bool(options.get("verify", False)),
    )


def segments_request(fetch: FetchArgs, manifest: pb.GetManifestResponse) -> pb.FetchShardSegmentsRequest:
    """FetchShardSegments for the plan the manifest pins."""
    return pb.FetchShardSegmentsRequest(
        shard=fetch.shard.proto(manifest.revision),
        names=fetch.names or [],
        manifest_id=manifest.manifest_id,
        runs=True,
    )


def shm_unsupported(error: FetchError) -> bool:
    """Whether a FetchShardSegments failure means "stream chunks instead" (an older server, or one on TCP)."""
    code = error.code()
    return code == grpc.StatusCode.UNIMPLEMENTED or (
        code == grpc.StatusCode.FAILED_PRECONDITION and "listening on a Unix socket" in str(error)
    )


def redeem_fallback(fetch: FetchArgs, error: RedeemError, address: str, said: bool) -> bool:
    """Whether a fetch whose grant could not be redeemed streams chunks instead: only with transport="auto".

    Says why at WARNING the first time for a client (`said` False) and at DEBUG after: a
    stuck side socket fails every fetch alike. Returns False to re-raise `error`.
    """
    if fetch.transport != "auto":
        return False
    (logger.debug if said else logger.warning)("%s: streaming chunks: %s", address, error)
    return True


def shm_fallback(fetch: FetchArgs, target: str) -> str | None:
    """Why this fetch streams chunks rather than shared memory ('' when it simply should); None: use shm."""
    if fetch.transport in ("grpc", "packed"):
        return ""
    if is_unix(target):
        return None
    if fetch.transport == "shm":
        return f"shared memory needs the server on this host over a Unix socket, and {target} is TCP"
    return ""


def check_device(device: torch.device, model: str) -> None:
    """Refuse a CUDA device this process cannot allocate on, saying why.

    Raises:
        FetchError: FAILED_PRECONDITION: torch has no CUDA (or ROCm) build, no GPU is
            visible, or the device index is past the GPUs there are.
    """
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        built = torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None
        reason = (
            "no CUDA device is visible to this process" if built else f"torch {torch.__version__} has no CUDA build"
        )
    elif device.index is not None and device.index >= torch.cuda.device_count():
        reason = f"this process sees {torch.cuda.device_count()} CUDA device(s)"
    else:
        return
    raise FetchError(
        f"fetch {model}: FAILED_PRECONDITION: device {device} was asked for, but {reason}; fetch to 'cpu' instead",
        grpc.StatusCode.FAILED_PRECONDITION,
    )


PROBE_SECONDS = 2.0
"""How long the probe that explains a call's timeout waits (it does not wait for the channel)."""


def unreachable(address: str, probe: grpc.RpcError) -> FetchError | None:
    """The error of a server the channel never reached, from a probe that did not wait for it
    (gRPC's words: connection refused, a failed TLS handshake); None when the probe was only slow."""
    if probe.code() != grpc.StatusCode.UNAVAILABLE:
        return None
    return FetchError(f"cannot reach {address}: {probe.details()}", grpc.StatusCode.UNAVAILABLE)


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
        fetch: FetchArgs,
        manifest: pb.GetManifestResponse,
        policy: RetryPolicy,
        *,
        replica: str = "",
        started: float | None = None,
    ) -> None:
        """`replica`: the address streamed from; `started`: time.monotonic() when the fetch began (default: now)."""
        self.args = fetch.shard
        self.dtype = fetch.dtype
        check_expert_slots(manifest, fetch.shard.model)
        check_plan(manifest, fetch.shard.model)
        self.manifest = manifest
        self.names = list(fetch.names) if fetch.names else []
        self.policy = policy
        wanted = set(self.names) or None
        total = sum(t.nbytes for t in manifest.tensors if wanted is None or t.name in wanted)
        self.bar = progress_bar(total, self.args.model)
        self.session = FetchSession(
            manifest, fetch.names, fetch.device, on_bytes=self.bar.update, destinations=fetch.destinations
        )
        self.started = time.monotonic() if started is None else started
        self.session.stats.replica = replica
        self.session.stats.tensors = len(self.session.pending)
        self.session.stats.version = manifest.version
        self.attempt = 0
        self.packed = fetch.transport != "grpc"
        """Ask for TRANSPORT_GRPC_PACKED (dropped for good if the server does not speak it)."""
        self._integrity_failures = 0
        self._last_error: grpc.RpcError | None = None
        self._pause_started = 0.0

    @property
    def stats(self) -> FetchStats:
        return self.session.stats

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The finished fetch's tensors, converted to the requested dtype."""
        return self.session.state_dict(self.dtype)

    def next_request(self) -> pb.FetchShardRequest | None:
        """The request for the next stream, or None when everything has arrived."""
        if self.session.complete:
            self._stop()
            logger.info("fetched %s %s: %s", self.args.model, _ranks(self.args), self.stats.summary())
            return None
        self.attempt += 1
        self.session.stats.attempts = self.attempt
        request = pb.FetchShardRequest(
            shard=self.args.proto(self.manifest.revision),
            names=self.names,
            manifest_id=self.manifest.manifest_id,
            transport=pb.TRANSPORT_GRPC_PACKED if self.packed else pb.TRANSPORT_GRPC_CHUNKS,
        )
        point = self.session.resume_point()
        if point is not None:
            request.resume_from.tensor, request.resume_from.offset = point
        return request

    def on_message(self, message: bytes) -> None:
        stats = self.session.stats
        if stats.time_to_first_chunk is None:
            stats.time_to_first_chunk = time.monotonic() - self.started
        stats.bytes_received += len(message)
        if stats.reconnects:
            stats.bytes_after_reconnect += len(message)
        self.session.accept(message)

    def stall_watch(self) -> StallWatch:
        """A watch over this fetch's streams, by its bytes received (close it when the fetch ends)."""
        return StallWatch(self.policy.stream_idle_timeout, lambda: self.session.stats.bytes_received)

    def async_stall_watch(self) -> AsyncStallWatch:
        """`stall_watch` for a grpc.aio fetch."""
        return AsyncStallWatch(self.policy.stream_idle_timeout, lambda: self.session.stats.bytes_received)

    def receive(self, stream: Iterable[bytes], watch: StallWatch) -> None:
        """Read one stream to its end into the fetch (`watch` cancels it should it stall)."""
        with watch.watching(stream):
            for message in stream:
                self.on_message(message)
        self.on_stream_end()

    async def receive_async(self, stream: AsyncIterable[bytes], watch: AsyncStallWatch) -> None:
        """`receive` for a grpc.aio stream."""
        async with watch.watching(stream):
            async for message in stream:
                self.on_message(message)
        self.on_stream_end()

    def on_stream_end(self) -> None:
        if not self.session.complete:
            raise IntegrityError("stream ended before the last tensor")

    def on_integrity_error(self, error: IntegrityError) -> None:
        """Resume at once from the last verified byte, a bounded number of times."""
        self._integrity_failures += 1
        self.session.stats.integrity_retries = self._integrity_failures
        if self._integrity_failures > self.policy.integrity_retries:
            self._stop()
            raise FetchError(
                f"fetch {self.args.model}: DATA_LOSS: {error} ({self._integrity_failures} checksum failures)",
                grpc.StatusCode.DATA_LOSS,
            ) from error

    @property
    def resuming(self) -> bool:
        """True once a stream broke: later streams wait for a ready channel (wait_for_ready)."""
        return self.session.stats.reconnects > 0

    def on_rpc_error(self, error: grpc.RpcError) -> Pause:
        """How to wait before resuming; raises FetchError when the error cannot change or time is up.

        A RESOURCE_EXHAUSTED is retried only when the server hinted when (retry-after-ms);
        the hinted delay is then the least wait.
        """
        if self.packed and _refuses_packing(error):
            logger.info("%s: the server does not pack tensors (%s); streaming plain chunks", self.args.model,
                        error.details())  # fmt: skip
            self.packed = False
            self._pause_started = time.monotonic()
            return Pause(floor=0.0, limit=self.policy.retry_deadline)
        hint = retry_after(_trailing_metadata(error))
        if not self.policy.should_retry(error.code(), self.attempt, hinted=hint is not None):
            self._stop()
            raise fetch_error(error, f"fetch {self.args.model} (attempt {self.attempt})") from None
        self._last_error = error
        left = self.policy.retry_deadline - self.session.stats.retry_wait_seconds
        if left <= 0:
            raise self._gave_up(error) from None
        self.session.stats.reconnects += 1
        self._pause_started = time.monotonic()
        floor = max(self.policy.backoff(self.attempt), hint or 0.0)
        return Pause(floor=min(floor, left), limit=left)

    def after_pause(self, ready: bool) -> None:
        """Count the wait that on_rpc_error's Pause asked for; raises FetchError if the channel never got ready."""
        self.session.stats.retry_wait_seconds += time.monotonic() - self._pause_started
        if not ready:
            assert self._last_error is not None
            raise self._gave_up(self._last_error) from None

    def _stop(self) -> None:
        """The fetch ends here, done or failed: close the bar, take the time."""
        self.bar.close()
        self.session.stats.seconds = time.monotonic() - self.started

    def _gave_up(self, error: grpc.RpcError) -> FetchError:
        self._stop()
        waited = self.session.stats.retry_wait_seconds
        code = error.code()
        return FetchError(
            f"fetch {self.args.model}: {code.name}: gave up after waiting {waited:.1f}s in all for the server "
            f"(RetryPolicy.retry_deadline {self.policy.retry_deadline:g}s; streams opened: {self.attempt}): "
            f"{error.details()}",
            code,
        )


def _refuses_packing(error: grpc.RpcError) -> bool:
    """Whether a stream failed because the server predates TRANSPORT_GRPC_PACKED."""
    return error.code() == grpc.StatusCode.INVALID_ARGUMENT and "is not one this server speaks" in (
        error.details() or ""
    )


def _ranks(shard: ShardArgs) -> str:
    """Which ranks: "rank 3/8", with the pipeline stage and the EP rank when the fetch names them."""
    text = f"rank {shard.rank}/{shard.world_size}"
    if shard.pp_size > 1:
        text += f" pp {shard.pp_rank}/{shard.pp_size}"
    if shard.ep_size:
        text += f" ep {shard.ep_rank}/{shard.ep_size}"
    return text


@dataclass(frozen=True)
class Pause:
    """The wait between two streams: at least `floor` seconds, then until the channel is
    ready, `limit` seconds at most in all."""

    floor: float
    limit: float

    def ready_timeout(self, waited: float) -> float:
        """Seconds left to wait for a ready channel after `waited` (a moment at least, to look)."""
        return max(self.limit - waited, 0.05)


def _trailing_metadata(error: grpc.RpcError) -> Any:
    """A failed call's trailing metadata (sync and asyncio errors alike), or None."""
    trailing = getattr(error, "trailing_metadata", None)
    return trailing() if callable(trailing) else None
