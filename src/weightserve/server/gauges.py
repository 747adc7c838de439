"""The gauges read from the server's state at each scrape: cache, streams, disk caches, EPLB.

Each function returns a source for metrics.StateCollector. Nothing here is updated on
the serving path: a scrape reads the numbers the cache, the stream gate and the control
plane already keep.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
from prometheus_client.core import Metric

from weightserve.cache.model_cache import ModelCache
from weightserve.server.control_plane import ControlPlane
from weightserve.server.metrics import GaugeSource, age_seconds, counter, gauge
from weightserve.server.stream_gate import StreamGate
from weightserve.storage.base import Storage

CACHE_STATES = ("loading", "warming", "ready")


def cache_gauges(cache: ModelCache) -> GaugeSource:
    def read() -> Iterator[Metric]:
        yield gauge("weightserve_cache_budget_bytes", "The memory budget (--cache-memory; 0: none)", (),
                    [((), cache.budget.limit)])  # fmt: skip
        yield gauge("weightserve_cache_resident_bytes", "Bytes of cached chunks and manifests held", (),
                    [((), cache.budget.resident())])  # fmt: skip
        yield gauge("weightserve_cache_window_bytes", "Bytes reserved by the windows of streams in flight", (),
                    [((), cache.budget.windows)])  # fmt: skip
        counts = dict.fromkeys(CACHE_STATES, 0)
        for entry in cache.open_entries():
            counts["warming" if entry.warming else "ready"] += 1
        counts["loading"] = len(cache.loading())
        yield gauge("weightserve_cache_entries", "Open model revisions, by state", ("state",),
                    [((state,), n) for state, n in counts.items()])  # fmt: skip

    return read


def stream_gauges(gate: StreamGate) -> GaugeSource:
    def read() -> Iterator[Metric]:
        yield gauge("weightserve_active_streams", "Data streams (FetchShard, FetchFiles) in flight", (),
                    [((), gate.active)])  # fmt: skip
        yield counter("weightserve_stream_refusals", "Streams refused by a stream limit (server, peer or token)",
                      (), [((), gate.refused)])  # fmt: skip
        yield counter("weightserve_stream_stalls", "Streams cut for making no progress", (),
                      [((), gate.stalled)])  # fmt: skip

    return read


def disk_cache_gauges(remotes: Mapping[str, Storage]) -> GaugeSource:
    def read() -> Iterator[Metric]:
        usage = [(scheme, cache) for scheme, storage in remotes.items() if (cache := getattr(storage, "cache", None))]
        yield gauge("weightserve_disk_cache_bytes", "Bytes of remote models in the disk cache", ("backend",),
                    [((scheme,), cache.used_bytes()) for scheme, cache in usage])  # fmt: skip
        yield counter("weightserve_disk_cache_downloads", "Models downloaded into the disk cache",
                      ("backend",), [((scheme,), cache.downloads) for scheme, cache in usage])  # fmt: skip

    return read


def eplb_gauges(control: ControlPlane) -> GaugeSource:
    """The EPLB gauges, labelled by the control state's own model names.

    The cache's view ("other" for a model not open now) would give two evicted models,
    or every model restored from --state-dir, the same label: duplicate series, of which
    Prometheus keeps an arbitrary one. The control state's names are canonical and only
    ever those of MoE models that opened here (or on the server that saved the state),
    so each model is one series and a name a caller made up never becomes a label.
    """

    def read() -> Iterator[Metric]:
        versions = [((m,), current.version) for m in sorted(control.histories) if (current := control.current(m))]
        yield gauge("weightserve_eplb_mapping_version", "The expert mapping version in force (0: the start one)",
                    ("model",), versions)  # fmt: skip
        ages = [((m,), age_seconds(t)) for m, t in sorted(control.last_report_wall.items())]
        yield gauge("weightserve_eplb_last_report_age_seconds", "Seconds since the last expert load report",
                    ("model",), ages)  # fmt: skip
        imbalance = []
        for model, window in sorted(control.windows.items()):
            if window.total is None:
                continue
            loads = window.total.to(torch.float64)
            means = loads.mean(dim=1).clamp(min=1e-12)
            ratios = (loads.max(dim=1).values / means).tolist()
            imbalance += [((model, str(layer)), ratio) for layer, ratio in enumerate(ratios)]
        yield gauge(
            "weightserve_eplb_layer_load_imbalance",
            "Per MoE layer, the hottest expert's load over the mean, in the current load window",
            ("model", "layer"), imbalance,
        )  # fmt: skip

    return read


def sources(
    cache: ModelCache, gate: StreamGate, remotes: Mapping[str, Storage], control: ControlPlane
) -> Iterable[GaugeSource]:
    """Every gauge source of a server."""
    return (cache_gauges(cache), stream_gauges(gate), disk_cache_gauges(remotes), eplb_gauges(control))
