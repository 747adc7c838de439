"""Shared-memory grants against a small --cache-memory: requests at once are refused as
requests one after another are, because the bytes of segments still being built are
reserved in the budget before the build starts (and given back when it fails).
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from tests.integration.shmkit import ServeUnix
from weightserve.cache import segment_leases
from weightserve.cache.segments import Segment, SegmentSpec
from weightserve.config import reserved_bytes
from weightserve.loaders.sources import Source
from weightserve.testing import BackgroundServer, LlamaShape, write_llama_checkpoint
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc

SHAPE = LlamaShape(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=2000)  # fmt: skip
MODELS = [f"org/m{i}" for i in range(4)]
TWO_FIT = ["OK", "OK", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for seed, model in enumerate(MODELS):
        write_llama_checkpoint(root / model, SHAPE, num_files=1, seed=seed)
    return root


def small_budget(root: Path, serve_unix: ServeUnix) -> BackgroundServer:
    """A server whose budget holds the segments of two of the models, not three."""
    model_bytes = sum(f.stat().st_size for f in (root / MODELS[0]).glob("*.safetensors"))
    return serve_unix(root, cache_memory=reserved_bytes(1, 1 << 20) + model_bytes * 5 // 2,
                      read_threads=1, chunk_bytes=1 << 20)  # fmt: skip


def grants(server: BackgroundServer, at_once: bool) -> list[grpc.StatusCode]:
    """FetchShardSegments for every model, held unredeemed; each call's status."""
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.WeightServiceStub(channel)
        requests = [pb.FetchShardSegmentsRequest(shard=pb.ShardSpec(model=m)) for m in MODELS]
        if at_once:
            calls = [stub.FetchShardSegments.future(r, timeout=30) for r in requests]
        else:
            calls = []
            for r in requests:
                calls.append(stub.FetchShardSegments.future(r, timeout=30))
                calls[-1].exception()
        return [grpc.StatusCode.OK if c.exception() is None else c.exception().code() for c in calls]


@pytest.mark.fault(
    "shared-memory grants at once over the memory budget",
    expect="refused RESOURCE_EXHAUSTED exactly as one after another; leased bytes stay within --cache-memory",
    cases=2,
)
def test_grants_at_once_are_refused_as_grants_one_after_another(
    root: Path, serve_unix: ServeUnix, monkeypatch: pytest.MonkeyPatch
) -> None:
    stock = segment_leases.build_segment

    def slow(spec: SegmentSpec, sources: list[Source], label: str) -> Segment:
        time.sleep(0.3)  # every request is in before any build ends
        return stock(spec, sources, label)

    monkeypatch.setattr(segment_leases, "build_segment", slow)
    for at_once in (False, True):
        server = small_budget(root, serve_unix)
        assert server.server is not None
        budget = server.server.cache.budget
        statuses = grants(server, at_once)
        assert sorted(s.name for s in statuses) == TWO_FIT, at_once
        assert budget.used() <= budget.limit and budget.building == 0


@pytest.mark.fault("shared-memory grants at once over the memory budget")
def test_a_failed_build_gives_its_reservation_back(
    root: Path, serve_unix: ServeUnix, monkeypatch: pytest.MonkeyPatch
) -> None:
    stock = segment_leases.build_segment

    def failing(spec: SegmentSpec, sources: list[Source], label: str) -> Segment:
        raise OSError(12, "Cannot allocate memory")

    server = small_budget(root, serve_unix)
    assert server.server is not None
    monkeypatch.setattr(segment_leases, "build_segment", failing)
    assert all(s != grpc.StatusCode.OK for s in grants(server, at_once=True))
    assert server.server.cache.budget.building == 0
    monkeypatch.setattr(segment_leases, "build_segment", stock)
    assert sorted(s.name for s in grants(server, at_once=True)) == [
        "OK",
        "OK",
        "RESOURCE_EXHAUSTED",
        "RESOURCE_EXHAUSTED",
    ]
