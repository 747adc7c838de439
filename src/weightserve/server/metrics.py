"""Prometheus metrics: the Recorder the serving layers call, and the gauges read at scrape time.

Names follow Prometheus conventions (base units, `_total`, `_seconds`, `_bytes`), and the
gRPC ones are those of the widely used gRPC interceptors, so existing dashboards work.
Labels are closed sets: model names come from the operator's roots and allow-list (an
unknown model never becomes a label: requests for names the server cannot open are
counted under `model="other"`); there are no rank, tensor, expert or client labels.
EPLB metrics take the control plane's model names as they are, not the cache's view: it
records only models it keeps state for (MoE models that opened here), and a model evicted
while its load window lives on keeps its own label.

Recording never raises into the serving path: each method catches and logs (once) what
a broken metric throws. Every server owns its own registry, so several servers in one
process (tests) do not collide.
"""

from __future__ import annotations

import functools
import logging
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from weightserve._version import __version__
from weightserve.recording import Recorder

logger = logging.getLogger(__name__)

RPC_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
"""Seconds: from a health check to a 10-minute fetch of a large shard."""
FETCH_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
LOAD_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 600, 1800)
OTHER_MODEL = "other"
FLEET_SOURCES = ("origin", "replica")
"""Where a replica's disk cache got a model under --coordination: the origin, or another replica."""

F = TypeVar("F", bound=Callable[..., None])


def _never_raises(method: F) -> F:
    """Log (once per method) and swallow what recording throws: metrics must not break serving."""
    failed = False

    @functools.wraps(method)
    def safe(*args: Any, **kwargs: Any) -> None:
        nonlocal failed
        try:
            method(*args, **kwargs)
        except Exception:
            if not failed:
                failed = True
                logger.exception("recording %s failed; it is skipped from now on without a log", method.__name__)

    return safe  # type: ignore[return-value]


class PrometheusRecorder(Recorder):
    """Records into its own registry; `known_model` says which names may be labels."""

    def __init__(self, known_model: Callable[[str], bool] = lambda _: True) -> None:
        disable_created_metrics()  # process-wide: *_created would double every counter's series
        self.registry = CollectorRegistry()
        self.known_model = known_model
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        Info("weightserve_build", "weightserve's version and the runtime it runs on", registry=r).info(
            {"version": __version__, "python": platform.python_version()}
        )
        rpc = ("grpc_type", "grpc_service", "grpc_method")
        self.rpc_started_total = Counter("grpc_server_started", "RPCs started on the server", rpc, registry=r)
        self.rpc_handled_total = Counter(
            "grpc_server_handled", "RPCs completed on the server, by status code", (*rpc, "grpc_code"), registry=r
        )
        self.rpc_seconds = Histogram(
            "grpc_server_handling_seconds", "Time to complete an RPC", rpc, buckets=RPC_BUCKETS, registry=r
        )
        self.rpc_sent_total = Counter("grpc_server_msg_sent", "Response messages sent", rpc, registry=r)
        self.sent_bytes = Counter(
            "weightserve_sent_bytes", "Bytes of TensorChunk messages sent", ("model", "layout"), registry=r
        )
        self.fetch_seconds = Histogram(
            "weightserve_fetch_seconds",
            "Duration of a FetchShard stream",
            ("model",),
            buckets=FETCH_BUCKETS,
            registry=r,
        )
        self.first_chunk_seconds = Histogram(
            "weightserve_time_to_first_chunk_seconds",
            "Time from a FetchShard call to its first chunk",
            ("model",),
            buckets=FETCH_BUCKETS,
            registry=r,
        )
        self.auth_refusals = Counter(
            "weightserve_auth_refusals", "Calls refused by the token check, by reason", ("reason",), registry=r
        )
        self.shm_granted_bytes = Counter(
            "weightserve_shm_granted_bytes",
            "Bytes of tensors granted in shared-memory segments (FetchShardSegments)",
            ("model", "layout"),
            registry=r,
        )
        self.streams_total = Counter("weightserve_streams", "FetchShard streams started", ("model",), registry=r)
        self.resumed_total = Counter(
            "weightserve_resumed_streams", "FetchShard streams that asked for a resume point", ("model",), registry=r
        )
        self.read_bytes = Counter(
            "weightserve_read_bytes",
            "Payload bytes streams took, by where they came from: local, hf, s3, dummy, or cache",
            ("source",),
            registry=r,
        )
        self.cache_hits = Counter("weightserve_cache_hits", "Chunks found in the memory cache", registry=r)
        self.cache_misses = Counter("weightserve_cache_misses", "Chunks read from storage", registry=r)
        self.single_flight_waits = Counter(
            "weightserve_cache_single_flight_waits", "Requests that waited for another's load or read", registry=r
        )
        self.evictions = Counter("weightserve_cache_evictions", "Times cached chunks were dropped", registry=r)
        self.evicted_bytes = Counter("weightserve_cache_evicted_bytes", "Bytes of cached chunks dropped", registry=r)
        self.refusals = Counter(
            "weightserve_cache_refusals", "Streams refused for want of memory (RESOURCE_EXHAUSTED)", registry=r
        )
        self.load_seconds = Histogram(
            "weightserve_model_load_seconds",
            "Time to open a model revision (downloading it first, if remote)",
            ("source",),
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.load_bytes = Counter(
            "weightserve_model_load_bytes", "Bytes of model revisions opened", ("source",), registry=r
        )
        self.load_reports = Counter(
            "weightserve_eplb_load_reports", "Expert load reports counted", ("model",), registry=r
        )
        self.rebalances = Counter(
            "weightserve_eplb_rebalances", "Rebalance jobs finished", ("model", "policy", "outcome"), registry=r
        )
        self.rebalance_seconds = Histogram(
            "weightserve_eplb_rebalance_seconds",
            "Time a rebalance job took",
            ("policy",),
            buckets=RPC_BUCKETS,
            registry=r,
        )
        self.balancedness = Gauge(
            "weightserve_eplb_balancedness",
            "Mean over max GPU load of the last rebalance, before and after it",
            ("model", "when"),
            registry=r,
        )
        self.group_locality = Gauge(
            "weightserve_eplb_group_locality",
            "Share of expert slots on the node holding most of their group's slots, before and after the last "
            "rebalance",
            ("model", "when"),
            registry=r,
        )
        self.dispatch_nodes = Gauge(
            "weightserve_eplb_dispatch_nodes_per_token",
            "Estimated nodes one token's dispatch reaches per MoE layer, before and after the last rebalance",
            ("model", "when"),
            registry=r,
        )
        self.balancedness_bound = Gauge(
            "weightserve_eplb_balancedness_bound",
            "Best balancedness any placement with every group on one node reaches on the last rebalance's load "
            "(0: groups cannot each sit on one node)",
            ("model",),
            registry=r,
        )
        self.fleet_fills = Counter(
            "weightserve_fleet_fills",
            "Remote models put into this replica's disk cache under --coordination, by source: origin or replica",
            ("source",),
            registry=r,
        )
        self.fleet_fill_bytes = Counter(
            "weightserve_fleet_fill_bytes",
            "Bytes of remote models put into this replica's disk cache under --coordination, by source",
            ("source",),
            registry=r,
        )
        for source in FLEET_SOURCES:  # both at 0 from the start, so a ratio of the two is defined at once
            self.fleet_fills.labels(source)
            self.fleet_fill_bytes.labels(source)
        self.uncoordinated_downloads = Counter(
            "weightserve_fleet_uncoordinated_downloads",
            "Downloads from the origin without coordination because Redis could not be reached",
            registry=r,
        )
        self.lease_waits = Counter(
            "weightserve_fleet_lease_waits", "Model fills that waited for another replica's download", registry=r
        )
        self.lease_wait_seconds = Histogram(
            "weightserve_fleet_lease_wait_seconds",
            "Time a model fill waited for another replica's download",
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.lease_takeovers = Counter(
            "weightserve_fleet_lease_takeovers",
            "Download leases taken after waiting on a holder that never published (it died or gave up)",
            registry=r,
        )
        self.leases_lost = Counter(
            "weightserve_fleet_leases_lost", "Downloads that lost their lease before publishing", registry=r
        )
        self.replica_fill_sent_bytes = Counter(
            "weightserve_replica_fill_sent_bytes", "File bytes FillReplica sent to other replicas", registry=r
        )

    def model_label(self, model: str) -> str:
        return model if model and self.known_model(model) else OTHER_MODEL

    @staticmethod
    def expert_model_label(model: str) -> str:
        """An EPLB metric's label: the control plane's own name for the model, whether it is open or not."""
        return model or OTHER_MODEL

    @_never_raises
    def rpc_started(self, service: str, method: str, kind: str) -> None:
        self.rpc_started_total.labels(kind, service, method).inc()

    @_never_raises
    def rpc_handled(self, service: str, method: str, kind: str, code: str, seconds: float) -> None:
        self.rpc_handled_total.labels(kind, service, method, code).inc()
        self.rpc_seconds.labels(kind, service, method).observe(seconds)

    @_never_raises
    def rpc_message_sent(self, service: str, method: str, kind: str) -> None:
        self.rpc_sent_total.labels(kind, service, method).inc()

    @_never_raises
    def stream_started(self, model: str, layout: str, resumed: bool) -> None:
        label = self.model_label(model)
        self.streams_total.labels(label).inc()
        if resumed:
            self.resumed_total.labels(label).inc()

    @_never_raises
    def first_chunk(self, model: str, seconds: float) -> None:
        self.first_chunk_seconds.labels(self.model_label(model)).observe(seconds)

    @_never_raises
    def bytes_sent(self, model: str, layout: str, nbytes: int) -> None:
        self.sent_bytes.labels(self.model_label(model), layout).inc(nbytes)

    @_never_raises
    def stream_finished(self, model: str, layout: str, nbytes: int, seconds: float) -> None:
        self.fetch_seconds.labels(self.model_label(model)).observe(seconds)

    @_never_raises
    def segments_granted(self, model: str, layout: str, nbytes: int) -> None:
        self.shm_granted_bytes.labels(self.model_label(model), layout).inc(nbytes)

    @_never_raises
    def bytes_read(self, source: str, nbytes: int) -> None:
        self.read_bytes.labels(source).inc(nbytes)

    @_never_raises
    def cache_lookup(self, hit: bool) -> None:
        (self.cache_hits if hit else self.cache_misses).inc()

    @_never_raises
    def single_flight_wait(self) -> None:
        self.single_flight_waits.inc()

    @_never_raises
    def cache_eviction(self, nbytes: int) -> None:
        self.evictions.inc()
        self.evicted_bytes.inc(nbytes)

    @_never_raises
    def model_loaded(self, source: str, nbytes: int, seconds: float) -> None:
        self.load_seconds.labels(source).observe(seconds)
        self.load_bytes.labels(source).inc(nbytes)

    @_never_raises
    def auth_refused(self, reason: str) -> None:
        self.auth_refusals.labels(reason).inc()

    @_never_raises
    def budget_refusal(self) -> None:
        self.refusals.inc()

    @_never_raises
    def load_report(self, model: str) -> None:
        self.load_reports.labels(self.expert_model_label(model)).inc()

    @_never_raises
    def rebalance_started(self, model: str, policy: str) -> None:
        label = self.expert_model_label(model)
        for outcome in ("succeeded", "failed"):  # both at 0 from the start, so increase() sees the first of each
            self.rebalances.labels(label, policy, outcome)

    @_never_raises
    def rebalance_finished(
        self,
        model: str,
        policy: str,
        outcome: str,
        seconds: float,
        before: float,
        after: float,
        locality: tuple[float, float] = (0.0, 0.0),
        dispatch: tuple[float, float] = (0.0, 0.0),
        bound: float = 0.0,
    ) -> None:
        label = self.expert_model_label(model)
        self.rebalances.labels(label, policy, outcome).inc()
        self.rebalance_seconds.labels(policy).observe(seconds)
        if outcome == "succeeded":
            for when, balance, local, nodes in zip(
                ("before", "after"), (before, after), locality, dispatch, strict=True
            ):
                self.balancedness.labels(label, when).set(balance)
                self.group_locality.labels(label, when).set(local)
                self.dispatch_nodes.labels(label, when).set(nodes)
            self.balancedness_bound.labels(label).set(bound)

    @_never_raises
    def fleet_fill(self, source: str, nbytes: int) -> None:
        self.fleet_fills.labels(source).inc()
        self.fleet_fill_bytes.labels(source).inc(nbytes)

    @_never_raises
    def fleet_uncoordinated(self) -> None:
        self.uncoordinated_downloads.inc()

    @_never_raises
    def lease_waiting(self) -> None:
        self.lease_waits.inc()

    @_never_raises
    def lease_waited(self, seconds: float) -> None:
        self.lease_wait_seconds.observe(seconds)

    @_never_raises
    def lease_takeover(self) -> None:
        self.lease_takeovers.inc()

    @_never_raises
    def lease_lost(self) -> None:
        self.leases_lost.inc()

    @_never_raises
    def replica_fill_sent(self, nbytes: int) -> None:
        self.replica_fill_sent_bytes.inc(nbytes)


GaugeSource = Callable[[], Iterable[Metric]]


class StateCollector(Collector):
    """Gauges read from the server's state at scrape time (nothing is kept between scrapes)."""

    def __init__(self, sources: Iterable[GaugeSource]) -> None:
        self.sources = list(sources)

    def collect(self) -> Iterator[Metric]:
        for source in self.sources:
            try:
                yield from source()
            except Exception:  # a broken gauge must not fail the whole scrape
                logger.exception("a metrics gauge failed to read the server's state")

    def describe(self) -> Iterator[Metric]:
        return iter(())  # read at scrape time only: nothing to check at registration


def gauge(
    name: str, documentation: str, labels: Iterable[str], values: Iterable[tuple[Iterable[str], float]]
) -> Metric:
    """A gauge family with the given label values."""
    family = GaugeMetricFamily(name, documentation, labels=list(labels))
    for label_values, value in values:
        family.add_metric(list(label_values), value)
    return family


def counter(
    name: str, documentation: str, labels: Iterable[str], values: Iterable[tuple[Iterable[str], float]]
) -> Metric:
    """A counter family (exported as `name`_total) read from a count the server keeps since start."""
    family = CounterMetricFamily(name, documentation, labels=list(labels))
    for label_values, value in values:
        family.add_metric(list(label_values), value)
    return family


def age_seconds(then: float) -> float:
    """Seconds since a time.time() timestamp (0 for none)."""
    return max(0.0, time.time() - then) if then else 0.0
