"""FleetClient: WeightClient over many replicas, routing each model to its own and failing over.

`WeightClient(["10.0.0.5:50051", "10.0.0.6:50051"])` or
`WeightClient("dns:///weightserve-headless.ns:50051")` returns one. It keeps one
single-address WeightClient (one channel) per replica and sends each call where
client/routing.py says:

- fetches of a plan that needs no control state go to one of the model's top
  `replicas_per_model` replicas (hashing model, rank and the node), then fail over down
  the model's rendezvous order;
- control calls (load reports, rebalances, mapping and version watches, publishing) and
  fetches that depend on control state (`ep_size`, `since_mapping`, `version`,
  `since_version`) go to the model's rendezvous owner, where that state lives. A delta
  fetch (since_mapping, since_version) that fails over to a replica without that state
  is answered FAILED_PRECONDITION there; the client then fetches its full share from
  that replica (a fresh manifest, without since_mapping / since_version) and logs a
  warning, unless that replica's version is older than since_version (an update would
  roll the weights back): then the fetch fails FAILED_PRECONDITION and writes nothing.
  Any other FAILED_PRECONDITION (the plan differs on the new replica: another
  revision, another expert mapping) ends the fetch, as it does on one server.

A stream that breaks is resumed on the next replica in order at once, under the same
manifest id (the id hashes revision, plan and wire version, so it is equal on every
replica) from the last verified chunk: no byte is fetched twice beyond that one chunk.
Only when every replica failed since the last progress does the fetch wait
(RetryPolicy's backoff, within its retry_deadline) for any of them to come back.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch
from grpc_health.v1 import health_pb2
from typing_extensions import Unpack

from weightserve.client import control, versions
from weightserve.client.assembly import FetchStats
from weightserve.client.common import FetchArgs, FetchOptions, Pause, ResumeLoop, ShardArgs, fetch_args, logger
from weightserve.client.modules import check_names
from weightserve.client.retry import RetryPolicy
from weightserve.client.routing import Router, Target
from weightserve.client.security import Pem
from weightserve.client.sync import WeightClient
from weightserve.errors import FetchError, IntegrityError
from weightserve.v1 import weightserve_pb2 as pb

T = TypeVar("T")

FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
"""Unary failures that say "this replica, not the request": the next replica is asked."""


def stateful(shard: ShardArgs) -> bool:
    """Whether a plan depends on control state that lives on the model's owner (EP mapping, versions)."""
    return bool(shard.ep_size) or any(v is not None for v in (shard.since_mapping, shard.version, shard.since_version))


def full_share_args(fetch: FetchArgs, endpoint: str) -> FetchArgs:
    """A delta fetch made whole, for a replica without the owner's control state (logged: it costs bytes)."""
    logger.warning("fetch %s: %s lacks the owner's control state; fetching the full share", fetch.shard.model, endpoint)
    shard = dataclasses.replace(fetch.shard, since_mapping=None, since_version=None)
    return dataclasses.replace(fetch, shard=shard)


def check_full_share(manifest: pb.GetManifestResponse, fetch: FetchArgs, endpoint: str) -> None:
    """Refuse a full share older than the version an update starts from.

    A replica without the owner's versions serves its own latest, often the checkpoint
    itself (version 0): applied as an update, it would roll the caller's weights back.

    Raises:
        FetchError: FAILED_PRECONDITION; the caller's tensors are untouched.
    """
    since = fetch.shard.since_version
    if since is not None and manifest.version < since:
        raise FetchError(
            f"fetch {fetch.shard.model}: FAILED_PRECONDITION: the owner is unreachable and {endpoint} serves "
            f"version {manifest.version}, older than since_version={since}; nothing was written (retry once "
            "the owner is back)",
            grpc.StatusCode.FAILED_PRECONDITION,
        )


class FleetRouting:
    """What FleetClient and AsyncFleetClient share: their settings, the Router, and the orders it gives."""

    router: Router
    last_fetch_stats: FetchStats | None

    def _setup_fleet(
        self,
        address: str | Sequence[str],
        *,
        retry: RetryPolicy | None,
        timeout: float,
        connect_timeout: float,
        server_name: str | None,
        replicas_per_model: int,
        spread_key: str | None,
        refresh_seconds: float,
        cooldown: float,
        **security: Any,
    ) -> None:
        """Parse the fleet address, make its Router, and keep the options every replica's client gets."""
        parsed = Target.parse(address)
        self.address = str(parsed)
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.router = Router(
            parsed,
            replicas_per_model=replicas_per_model,
            spread_key=spread_key,
            refresh_seconds=refresh_seconds,
            cooldown=cooldown,
        )
        self.health = self.router.health
        self.replicas_per_model = replicas_per_model
        self._options: dict[str, Any] = dict(
            retry=self.retry, timeout=timeout, server_name=server_name or parsed.host or None, **security
        )
        self._jobs: dict[str, str] = {}
        self.last_fetch_stats = None

    def endpoints(self) -> tuple[str, ...]:
        """The replicas now (a dns:/// target is resolved again when its answer is stale)."""
        return self.router.endpoints()

    def owner_order(self, model: str) -> list[str]:
        """Every replica in the model's rendezvous order; the first owns its control state."""
        return self.router.owner_order(model)

    def fetch_order(self, shard: ShardArgs) -> list[str]:
        """The replicas one fetch tries, in order (the owner first for a stateful plan)."""
        return self.router.fetch_order(shard.model, shard.rank, stateful=stateful(shard))


class FleetClient(FleetRouting, WeightClient):
    """WeightClient's calls over a fleet of replicas (see the module docstring).

    Args:
        address: a list of "host:port", "a:1,b:2", or "dns:///name:port" resolved
            every `refresh_seconds`.
        replicas_per_model: how many of a model's top replicas share its fetches (a hot
            model's spread); 1 sends every fetch of a model to its owner.
        spread_key: what, besides model and rank, picks among those replicas (default:
            this host's name, so rank r of each node asks a different replica).
        refresh_seconds: how often a dns:/// target is resolved again.
        connect_timeout: how long a unary call waits for a replica's channel before it
            tries the next one.
        cooldown: seconds a replica that failed is tried last.
        server_name: under TLS, the name the replicas' certificates carry (default: the
            dns:/// name; give it for a list of IPs).
        The other arguments are WeightClient's, applied to every replica.
    """

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
        self._replicas: dict[str, WeightClient] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ plumbing

    def replica(self, endpoint: str) -> WeightClient:
        """The single-address client of one replica (made on first use, kept until close)."""
        with self._lock:
            client = self._replicas.get(endpoint)
            if client is None:
                client = self._replicas[endpoint] = WeightClient(endpoint, **self._options)
            return client

    def __enter__(self) -> FleetClient:
        return self

    def close(self) -> None:
        with self._lock:
            replicas, self._replicas = list(self._replicas.values()), {}
        for client in replicas:
            client.close()

    def _ready(self, endpoint: str, wait: float | None = None) -> bool:
        """Whether the replica answers a health check SERVING within `wait` (default connect_timeout).

        One that does not is marked down. (A health call with wait_for_ready, not
        channel_ready_future, whose polling thread outlives the channel it watches.)
        """
        request = health_pb2.HealthCheckRequest()
        try:
            answer = self.replica(endpoint)._health.Check(
                request, timeout=self.connect_timeout if wait is None else wait, wait_for_ready=True
            )
        except grpc.RpcError:
            self.health.mark_down(endpoint)
            return False
        if answer.status != health_pb2.HealthCheckResponse.SERVING:
            self.health.mark_down(endpoint)
            return False
        return True

    def _first(self, order: Sequence[str], action: str, call: Callable[[WeightClient], T]) -> tuple[T, str]:
        """`call` on the first replica in `order` that answers; its result and the replica.

        Replicas marked down are tried last; one that cannot be reached or answers
        UNAVAILABLE / DEADLINE_EXCEEDED is marked down and the next one asked.

        Raises:
            FetchError: another failure (at once), or the last replica's failure.
        """
        last: FetchError | None = None
        for endpoint in self.health.live_first(order):
            if not self.health.recently_up(endpoint) and not self._ready(endpoint):
                last = FetchError(f"{action}: cannot reach {endpoint}", grpc.StatusCode.UNAVAILABLE)
                continue
            try:
                result = call(self.replica(endpoint))
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

    def _on_owner(self, model: str, action: str, call: Callable[[WeightClient], T]) -> T:
        return self._first(self.owner_order(model), f"{action} {model}", call)[0]

    # ------------------------------------------------------------------ fetches

    def get_manifest(
        self, model: str, rank: int = 0, world_size: int = 1, **options: Unpack[FetchOptions]
    ) -> pb.GetManifestResponse:
        """One rank's plan, from the replica its fetch would go to first."""
        shard = fetch_args(model, rank, world_size, options).shard
        return self._first(self.fetch_order(shard), f"manifest of {model}", lambda c: c._manifest(shard))[0]

    def fetch_state_dict(
        self, model: str, rank: int = 0, world_size: int = 1, **options: Unpack[FetchOptions]
    ) -> dict[str, torch.Tensor]:
        """WeightClient.fetch_state_dict over the fleet: resumed on the next replica when one fails.

        `last_fetch_stats.replica` names the replica that sent the last bytes;
        `reconnects` counts the failovers and resumes.
        """
        started, self.last_fetch_stats = time.monotonic(), None
        fetch = fetch_args(model, rank, world_size, options)
        if fetch.transport == "shm":
            logger.info("%s: streaming chunks: a fleet is reached over TCP, not shared memory", self.address)
        order = self.fetch_order(fetch.shard)
        manifest, endpoint = self._first(order, f"manifest of {model}", lambda c: c._manifest(fetch.shard))
        check_names(manifest, fetch.names, model)
        return self._stream(fetch, manifest, order, endpoint, started)

    def _stream(
        self, fetch: FetchArgs, manifest: pb.GetManifestResponse, order: list[str], endpoint: str, started: float
    ) -> dict[str, torch.Tensor]:
        loop = ResumeLoop(fetch, manifest, self.retry, replica=endpoint, started=started)
        self.last_fetch_stats = loop.stats
        failed: set[str] = set()  # replicas that broke a stream since the last verified byte
        with loop.stall_watch() as watch:
            while (request := loop.next_request()) is not None:
                before = loop.stats.payload_bytes
                stream = self.replica(endpoint)._fetch(request, wait_for_ready=False)
                try:
                    loop.receive(stream, watch)
                except IntegrityError as e:
                    loop.on_integrity_error(e)
                except grpc.RpcError as e:
                    e = watch.explain(e)  # a stalled replica fails over like a broken one
                    if self._lacks_state(e, fetch, endpoint, order):
                        return self._full_share(fetch, endpoint, order, started)
                    pause = loop.on_rpc_error(e)  # raises when the error cannot change by asking again
                    self.health.mark_down(endpoint)
                    if loop.stats.payload_bytes > before:
                        failed.clear()
                    failed.add(endpoint)
                    endpoint = self._next(order, failed, loop, pause, endpoint, e)
                finally:
                    stream.cancel()
        self.health.mark_up(endpoint)
        return loop.state_dict()

    def _next(
        self, order: list[str], failed: set[str], loop: ResumeLoop, pause: Pause, endpoint: str, error: grpc.RpcError
    ) -> str:
        """The replica to resume on: the next one in order at once, or, when all failed, the first to come back."""
        untried = [e for e in self.health.live_first(order) if e not in failed]
        if untried:
            logger.warning(
                "fetch %s: %s failed (%s); resuming on %s", loop.args.model, endpoint, error.code().name, untried[0]
            )
            loop.after_pause(True)
            loop.stats.replica = untried[0]
            return untried[0]
        waited_from = time.monotonic()
        time.sleep(pause.floor)
        while True:
            for candidate in order:
                if not self._ready(candidate, wait=0.2):
                    continue
                loop.after_pause(True)
                failed.clear()
                loop.stats.replica = candidate
                return candidate
            if time.monotonic() - waited_from >= pause.limit:
                loop.after_pause(False)  # raises the FetchError that ends the fetch

    def _lacks_state(self, error: grpc.RpcError, fetch: FetchArgs, endpoint: str, order: list[str]) -> bool:
        """A delta fetch (since_mapping, since_version) that failed over away from the owner to a replica
        without the state the delta is relative to."""
        delta = fetch.shard.since_mapping is not None or fetch.shard.since_version is not None
        return error.code() == grpc.StatusCode.FAILED_PRECONDITION and delta and endpoint != order[0]

    def _full_share(self, fetch: FetchArgs, endpoint: str, order: list[str], started: float) -> dict[str, torch.Tensor]:
        """Fetch the whole share from `endpoint`, which lacks the owner's control state."""
        full = full_share_args(fetch, endpoint)
        manifest = self.replica(endpoint)._manifest(full.shard)
        check_full_share(manifest, fetch, endpoint)
        return self._stream(full, manifest, [endpoint, *(e for e in order if e != endpoint)], endpoint, started)

    # ------------------------------------------------------------------ the rest of WeightClient

    def list_models(self) -> list[pb.ModelInfo]:
        """Every model the fleet serves (asked of one replica: they share their roots)."""
        return self._first(sorted(self.endpoints()), "list models", lambda c: c.list_models())[0]

    def fetch_files(
        self, model: str, dest: str | Path, patterns: list[str] | None = None, revision: str | None = None
    ) -> list[Path]:
        order = self.fetch_order(ShardArgs(model))
        return self._first(order, f"files of {model}", lambda c: c.fetch_files(model, dest, patterns, revision))[0]

    def prefetch(
        self, model: str, world_size: int = 1, ranks: list[int] | None = None, *, wait: bool = False
    ) -> pb.PrefetchResponse:
        """Warm the model on each of its top `replicas_per_model` replicas (the ones its fetches go to).

        Returns the owner's answer; a replica that cannot be reached is skipped with a warning.
        """
        answers = []
        for endpoint in self.owner_order(model)[: self.replicas_per_model]:
            try:
                answers.append(
                    self._first(
                        [endpoint], f"prefetch {model}", lambda c: c.prefetch(model, world_size, ranks, wait=wait)
                    )[0]
                )
            except FetchError as e:
                if e.code() not in FAILOVER_CODES:
                    raise
                logger.warning("prefetch %s: skipping %s: %s", model, endpoint, e)
        if not answers:
            raise FetchError(f"prefetch {model}: no replica of {self.address} answered", grpc.StatusCode.UNAVAILABLE)
        return answers[0]

    def evict(self, model: str) -> bool:
        """Drop the model's open state on every replica that answers; whether any held it."""
        evicted = False
        for endpoint in self.endpoints():
            try:
                evicted |= self._first([endpoint], f"evict {model}", lambda c: c.evict(model))[0]
            except FetchError as e:
                if e.code() not in FAILOVER_CODES:
                    raise
        return evicted

    def publish(
        self, model: str, state_dict: Mapping[str, torch.Tensor], *, base: int | None = None, **kwargs: Any
    ) -> int:
        return self._on_owner(model, "publish", lambda c: c.publish(model, state_dict, base=base, **kwargs))

    def list_versions(self, model: str) -> list[pb.VersionInfo]:
        return self._on_owner(model, "versions of", lambda c: c.list_versions(model))

    def watch_versions(
        self, model: str, after_version: int = 0, serving_version: int | None = None
    ) -> versions.VersionWatch:
        return self.replica(self.owner_order(model)[0]).watch_versions(model, after_version, serving_version)

    def report_expert_load(
        self, model: str, counts: control.ExpertLoad, *, ep_rank: int | None = None, sequence: int | None = None
    ) -> int:
        return self._on_owner(
            model, "report load of", lambda c: c.report_expert_load(model, counts, ep_rank=ep_rank, sequence=sequence)
        )

    def rebalance(self, model: str, **kwargs: Any) -> str:
        job = self._on_owner(model, "rebalance", lambda c: c.rebalance(model, **kwargs))
        self._jobs[job] = model
        return job

    def get_rebalance(self, job_id: str, *, wait: float = 0.0) -> pb.GetRebalanceResponse:
        """The job's state from the replica that runs it (its model's owner, or any that knows the job)."""
        model = self._jobs.get(job_id)
        order = self.owner_order(model) if model else sorted(self.endpoints())
        last: FetchError | None = None
        for endpoint in order:
            try:
                return self._first([endpoint], f"rebalance job {job_id}", lambda c: c.get_rebalance(job_id, wait=wait))[
                    0
                ]
            except FetchError as e:
                if e.code() not in {*FAILOVER_CODES, grpc.StatusCode.NOT_FOUND}:
                    raise
                last = e
        assert last is not None
        raise last

    def watch_mapping(
        self, model: str, after_version: int = 0, *, timeout: float | None = None
    ) -> Generator[pb.ExpertMapping, None, None]:
        return self.replica(self.owner_order(model)[0]).watch_mapping(model, after_version, timeout=timeout)
