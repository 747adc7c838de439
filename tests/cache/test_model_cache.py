"""The model cache over a real server: sharing, single flight, budget, prefetch."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

from weightserve.cache import model_cache
from weightserve.cache.budget import reserved_bytes
from weightserve.cache.model_cache import ModelCache
from weightserve.client import WeightClient
from weightserve.errors import FetchError
from weightserve.storage.local import LocalRoots
from weightserve.storage.router import StorageRouter
from weightserve.testing import LlamaShape, write_llama_checkpoint

SHAPE = LlamaShape(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
)
MODEL = "org/mid-llama"
CHUNK = 16 * 1024


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache-models")
    write_llama_checkpoint(root / MODEL, SHAPE, num_files=2)
    write_llama_checkpoint(root / "org/other", SHAPE, num_files=1, seed=1)
    return root


def reference(root: Path, model: str = MODEL) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted((root / model).glob("*.safetensors")):
        out |= load_file(path)
    return out


def bytes_read(server, model: str = MODEL) -> int:  # type: ignore[no-untyped-def]
    entries = [e for e in server.server.cache.entries.values() if e.name == model]
    return sum(s.bytes_read for e in entries for s in e.loader.sources)


def model_bytes(root: Path) -> int:
    return sum(t.numel() * t.element_size() for t in reference(root).values())


def file_bytes(root: Path, model: str = MODEL) -> int:
    """Every byte of the weight files: tensor data plus headers (read once when opening)."""
    return sum(p.stat().st_size for p in (root / model).glob("*.safetensors"))


def test_prefetched_ranks_read_nothing_from_storage(root, serve):  # type: ignore[no-untyped-def]
    server = serve(root, cache_memory=64 << 20, chunk_bytes=CHUNK)
    with WeightClient(server.address) as client:
        client.prefetch(MODEL, world_size=2, ranks=[1], wait=True)
        warmed = bytes_read(server)
        assert warmed > 0
        state = client.fetch_state_dict(MODEL, rank=1, world_size=2)
        assert bytes_read(server) == warmed  # served from memory: zero bytes from storage
        status = {m.name: m.cache for m in client.list_models()}[MODEL]
        assert status.resident_bytes > 0 and status.load_source == "local"
        direct = client.fetch_state_dict(MODEL, rank=1, world_size=2)
    assert state.keys() == direct.keys()
    assert all(torch.equal(state[k].view(torch.uint8), direct[k].view(torch.uint8)) for k in state)


def test_warm_fetch_reads_nothing_and_matches_the_files(root, serve):  # type: ignore[no-untyped-def]
    server = serve(root, cache_memory=64 << 20, chunk_bytes=CHUNK)
    ref = reference(root)
    with WeightClient(server.address) as client:
        cold = client.fetch_state_dict(MODEL)
        after_cold = bytes_read(server)
        assert after_cold == file_bytes(root)  # every byte read exactly once
        warm = client.fetch_state_dict(MODEL)
        assert bytes_read(server) == after_cold
    for name, tensor in ref.items():
        assert torch.equal(cold[name].view(torch.uint8), tensor.view(torch.uint8))
        assert torch.equal(warm[name].view(torch.uint8), tensor.view(torch.uint8))


def test_ten_concurrent_first_requests_cause_one_load(root, serve):  # type: ignore[no-untyped-def]
    server = serve(root, cache_memory=64 << 20, chunk_bytes=CHUNK)
    results: list[dict[str, torch.Tensor]] = []
    barrier = threading.Barrier(10)

    def fetch() -> None:
        with WeightClient(server.address) as client:
            barrier.wait(timeout=30)
            results.append(client.fetch_state_dict(MODEL))

    threads = [threading.Thread(target=fetch) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 10
    assert server.server.cache.loads_started == 1
    assert bytes_read(server) == file_bytes(root)  # single-flight chunk reads: each byte once


def test_failed_load_releases_every_waiter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "org" / "bad"
    bad.mkdir(parents=True)
    (bad / "model.safetensors").write_bytes(b"\xff" * 64)
    cache = ModelCache(StorageRouter(LocalRoots([tmp_path])))
    real_loader_for = model_cache.loader_for
    all_waiting = threading.Event()
    real_load = cache._load

    async def counted_load(*args):  # type: ignore[no-untyped-def]
        counted_load.calls += 1  # type: ignore[attr-defined]
        if counted_load.calls == 10:  # type: ignore[attr-defined]
            all_waiting.set()
        return await real_load(*args)

    counted_load.calls = 0  # type: ignore[attr-defined]
    monkeypatch.setattr(cache, "_load", counted_load)

    def gated_loader_for(fmt: str):  # type: ignore[no-untyped-def]
        def open_when_all_wait(files):  # type: ignore[no-untyped-def]
            assert all_waiting.wait(timeout=30), "not every request reached the load"
            return real_loader_for(fmt)(files)

        return open_when_all_wait

    monkeypatch.setattr(model_cache, "loader_for", gated_loader_for)

    async def many() -> list[BaseException | object]:
        async def one() -> object:
            async with cache.use("org/bad"):
                return None

        return await asyncio.gather(*(one() for _ in range(10)), return_exceptions=True)

    outcomes = asyncio.run(many())
    assert all(type(o).__name__ == "CorruptCheckpointError" for o in outcomes)
    assert cache.loads_started == 1


def test_eviction_never_touches_an_entry_being_streamed(root, serve):  # type: ignore[no-untyped-def]
    # room for the streamed model, not for a second one
    budget = reserved_bytes(read_threads=8, chunk_bytes=CHUNK) + int(1.2 * model_bytes(root))
    server = serve(root, cache_memory=budget, chunk_bytes=CHUNK, read_threads=8)
    cache = server.server.cache
    ref = reference(root)
    with WeightClient(server.address) as client:
        stream = client._fetch(_request(client, MODEL))
        first = next(iter(stream))
        assert first
        streamed = next(e for e in cache.entries.values() if e.name == MODEL)
        assert streamed.pinned
        # Another model's fetch needs room: only unpinned entries may be evicted.
        client.fetch_state_dict("org/other")
        assert not streamed.retired
        assert streamed.loader.sources[0]._fd >= 0
        assert client.evict("org/other")
        rest = list(stream)
        assert rest
    state = WeightClient(server.address).fetch_state_dict(MODEL)
    assert all(torch.equal(state[k].view(torch.uint8), ref[k].view(torch.uint8)) for k in ref)


def _request(client: WeightClient, model: str):  # type: ignore[no-untyped-def]
    from weightserve.v1 import weightserve_pb2 as pb

    manifest = client.get_manifest(model)
    return pb.FetchShardRequest(shard=pb.ShardSpec(model=model), manifest_id=manifest.manifest_id)


def test_resource_exhausted_when_pinned_streams_leave_no_window(root, serve):  # type: ignore[no-untyped-def]
    # After the read-buffer reserve, the budget holds one stream window (prefetch_depth x chunk) and
    # the two models' manifests (about 8 KB each, counted in the budget), but not a second window.
    manifests = 24 * 1024
    budget = reserved_bytes(read_threads=8, chunk_bytes=CHUNK) + 2 * CHUNK + manifests
    server = serve(root, cache_memory=budget, chunk_bytes=CHUNK, prefetch_depth=2, read_threads=8)
    with WeightClient(server.address) as client:
        stream = client._fetch(_request(client, MODEL))
        assert next(iter(stream))
        with pytest.raises(FetchError) as err:
            WeightClient(server.address, retry=_no_retry()).fetch_state_dict("org/other")
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "budget" in str(err.value) and str(budget) in str(err.value)
        stream.cancel()
    # the server keeps serving once the window is free
    with WeightClient(server.address) as client:
        assert client.fetch_state_dict("org/other")


def _no_retry():  # type: ignore[no-untyped-def]
    from weightserve.client import RetryPolicy

    return RetryPolicy(max_attempts=1)


@pytest.mark.fault("model whose own cached chunks fill the budget")
def test_a_model_whose_own_chunks_fill_the_budget_still_streams(root, serve):  # type: ignore[no-untyped-def]
    """Prefetch fills the budget with the model's chunks; a fetch then needs a window. The model's
    chunks used to be untouchable once a stream pinned it, so every fetch of it was refused."""
    budget = reserved_bytes(read_threads=2, chunk_bytes=CHUNK) + 2 * CHUNK + model_bytes(root) // 2
    server = serve(root, cache_memory=budget, chunk_bytes=CHUNK, read_threads=2)
    ref = reference(root)
    with WeightClient(server.address, retry=_no_retry()) as client:
        client.prefetch(MODEL, wait=True)
        assert server.server.cache.status(MODEL).resident_bytes > model_bytes(root) // 4  # no room for a window
        for _ in range(2):  # the model larger than its share of the budget streams, twice
            state = client.fetch_state_dict(MODEL)
            assert all(torch.equal(state[k].view(torch.uint8), ref[k].view(torch.uint8)) for k in ref)
