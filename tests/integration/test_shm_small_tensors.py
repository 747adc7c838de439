"""Shared memory for checkpoints of thousands of small tensors, against real servers on Unix sockets.

Small neighbours share block segments and small own-bytes tensors (dim-1 slices, fused
tensors) share packs, so a grant is a handful of descriptors; the tensors are still
bit-identical to the gRPC path, in manifest order, for subsets and ranks, also where a
packed file leaves them misaligned for their dtype. Views are MAP_PRIVATE and release
every mapping, descriptor and lease once they are gone.
"""

from __future__ import annotations

import gc
import json
import os
import struct
from pathlib import Path

import grpc
import pytest
import torch

from tests.integration.shmkit import ServeUnix, leased, open_fds, wait_until
from weightserve import wire
from weightserve.client import WeightClient, placements
from weightserve.client import shm as client_shm
from weightserve.config import ServerConfig
from weightserve.server import proto_convert
from weightserve.testing import BackgroundServer, LlamaShape, write_llama_checkpoint, write_sharded_safetensors
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc

MANY = "org/many-small"
PACKED = "org/packed-small"
LLAMA = "org/tiny-llama"
PICKLE = "org/pickle-views"
SHAPE = LlamaShape(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=200)  # fmt: skip
SMALL = 3000
SEGMENT_BOUND = 8
"""Most segments a grant of MANY may take: blocks around a large tensor in each of two files, and the two."""


def small_tensors(count: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """float32 [16], bfloat16 [4, 8] and int8 [7] in turn, seeded."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n in range(count):
        kind = n % 3
        if kind == 0:
            out[f"layers.{n}.norm.weight"] = torch.randn(16, generator=gen)
        elif kind == 1:
            out[f"layers.{n}.proj.bias"] = torch.randn(4, 8, generator=gen).to(torch.bfloat16)
        else:
            out[f"layers.{n}.scale"] = torch.randint(-128, 128, (7,), generator=gen, dtype=torch.int8)
    return out


def many_small(seed: int = 0) -> dict[str, torch.Tensor]:
    """SMALL small tensors with a large one (>= 1 MiB) inside each half, so each file has one."""
    gen = torch.Generator().manual_seed(seed + 1)
    items = list(small_tensors(SMALL, seed).items())
    half = len(items) // 2
    items.insert(half // 2, ("embed.weight", torch.randn(512, 512, generator=gen)))  # 1 MiB
    items.insert(half + half // 2, ("lm_head.weight", torch.randn(1024, 1024, generator=gen).to(torch.bfloat16)))
    return dict(items)


def write_packed_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file with tensors back to back in the given order, unpadded: int8 [7] misaligns the rest."""
    header: dict[str, object] = {}
    at = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": wire.dtype_name(tensor.dtype), "shape": list(tensor.shape),
                        "data_offsets": [at, at + nbytes]}  # fmt: skip
        at += nbytes
    encoded = json.dumps(header).encode()
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for tensor in tensors.values():
            f.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("small-models")
    (root / MANY).mkdir(parents=True)
    write_sharded_safetensors(many_small(), root / MANY, num_files=2)
    (root / PACKED).mkdir(parents=True)
    write_packed_safetensors(small_tensors(600, seed=1), root / PACKED / "model.safetensors")
    write_llama_checkpoint(root / LLAMA, SHAPE, num_files=2)
    return root


@pytest.fixture(scope="module")
def over_grpc(root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, torch.Tensor]]:
    """MANY and PACKED as the gRPC path gives them, fetched once (a stream message per tensor is slow)."""
    path = tmp_path_factory.mktemp("grpc") / "ws.sock"
    config = ServerConfig(model_roots=(root,), listen=f"unix:{path}", metrics_listen="off")
    with BackgroundServer(config) as server, WeightClient(server.address) as client:
        return {model: client.fetch_state_dict(model, transport="grpc") for model in (MANY, PACKED)}


def assert_identical(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Same names in the same order, and each tensor's dtype, shape and bytes."""
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        other = got[name]
        assert (other.dtype, other.shape) == (tensor.dtype, tensor.shape), name
        assert other.contiguous().view(torch.uint8).equal(tensor.contiguous().view(torch.uint8)), name


def segment_mappings() -> int:
    """Mappings of this process onto weightserve's memfds."""
    with open("/proc/self/maps") as maps:
        return sum(1 for line in maps if "memfd:weightserve:" in line)


def misaligned(state: dict[str, torch.Tensor]) -> int:
    return sum(1 for t in state.values() if t.data_ptr() % t.element_size())


@pytest.mark.parametrize("model", [MANY, PACKED])
def test_thousands_of_small_tensors_are_bit_identical_to_the_grpc_path(
    root: Path, serve_unix: ServeUnix, over_grpc: dict[str, dict[str, torch.Tensor]], model: str
) -> None:
    server = serve_unix(root)
    expected = over_grpc[model]
    with WeightClient(server.address) as client:
        views = client.fetch_state_dict(model, transport="shm")
        assert client.last_fetch_stats is not None and client.last_fetch_stats.bytes_received == 0
        assert_identical(views, expected)
        assert_identical(client.fetch_state_dict(model, transport="shm", verify=True), expected)
        assert_identical(client.fetch_state_dict(model, transport="shm", copy=True), expected)
        if model == PACKED:
            assert misaligned(views) > 100  # the views that could not be strided over a typed segment


def test_a_grant_is_a_few_segments_not_one_per_tensor(root: Path, serve_unix: ServeUnix) -> None:
    server = serve_unix(root)
    shard = pb.ShardSpec(model=MANY)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.WeightServiceStub(channel)
        page = stub.GetManifest(pb.GetManifestRequest(shard=shard, page_size=1000))
        assert page.next_page_token  # paged: the plan is more than a page
        grant = stub.FetchShardSegments(pb.FetchShardSegmentsRequest(shard=shard, manifest_id=page.manifest_id))
    sizes = [s.size for s in grant.segments]
    assert len(grant.tensors) == SMALL + 2
    assert 2 < len(sizes) <= SEGMENT_BOUND
    checkpoint = sum(p.stat().st_size for p in (root / MANY).glob("*.safetensors"))
    assert sum(sizes) <= checkpoint  # blocks are file ranges, each byte once
    lease, fds = client_shm.redeem(grant.handoff_socket, grant.ticket, len(sizes), 10)
    try:
        assert [os.fstat(fd).st_size for fd in fds] == sizes
    finally:
        for fd in fds:
            os.close(fd)
        lease.close()
    wait_until(lambda: leased(server) == 0, "leases kept after the redeemed lease closed")


def test_asked_for_runs_a_grant_groups_its_tensors_as_the_client_would(
    root: Path, serve_unix: ServeUnix, tmp_path: Path
) -> None:
    """Runs replace the per-tensor placements, read back as the same runs; 1,000 alike tensors are one run."""
    uniform = tmp_path / "uniform"
    (uniform / "org/alike").mkdir(parents=True)
    alike = {f"experts.{n}.scale": torch.full((64,), n, dtype=torch.bfloat16) for n in range(1000)}
    write_sharded_safetensors(alike, uniform / "org/alike", num_files=1)
    for model_root, model, count in ((root, MANY, SMALL + 2), (uniform, "org/alike", 1000)):
        server = serve_unix(model_root)
        with WeightClient(server.address) as client:
            plan = client.get_manifest(model)
        request = pb.FetchShardSegmentsRequest(shard=pb.ShardSpec(model=model), manifest_id=plan.manifest_id)
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.WeightServiceStub(channel)
            per_tensor = stub.FetchShardSegments(request)
            request.runs = True
            grouped = stub.FetchShardSegments(request)
        assert len(per_tensor.tensors) == count and not per_tensor.runs
        assert not grouped.tensors and sum(len(run.tensor_index) for run in grouped.runs) == count
        assert placements.runs_of(grouped, plan) == placements.runs_of(per_tensor, plan)
    assert len(grouped.runs) == 1


def test_a_client_reads_a_server_that_predates_runs(
    root: Path, serve_unix: ServeUnix, over_grpc: dict[str, dict[str, torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older server ignores the request's runs field and answers a placement a tensor."""
    server = serve_unix(root)
    encode = proto_convert.shard_segments
    monkeypatch.setattr(proto_convert, "shard_segments", lambda grant, runs: encode(grant, False))
    with WeightClient(server.address) as client:
        for model in (MANY, PACKED):
            assert_identical(client.fetch_state_dict(model, transport="shm"), over_grpc[model])
            assert_identical(client.fetch_state_dict(model, transport="shm", copy=True, verify=True), over_grpc[model])


def test_a_subset_by_name_comes_from_the_shared_segments(
    root: Path, serve_unix: ServeUnix, over_grpc: dict[str, dict[str, torch.Tensor]]
) -> None:
    server = serve_unix(root)
    expected, packed = over_grpc[MANY], over_grpc[PACKED]
    with WeightClient(server.address) as client:
        names = [*[n for n in expected if n.startswith("layers.1")][:50], "lm_head.weight", "embed.weight"]
        subset = client.fetch_state_dict(MANY, transport="shm", names=names)
        assert_identical(subset, {n: t for n, t in expected.items() if n in set(names)})
        odd = list(packed)[1::97]
        assert_identical(client.fetch_state_dict(PACKED, transport="shm", names=odd, verify=True),
                         {n: packed[n] for n in odd})  # fmt: skip


@pytest.mark.parametrize("layout", ["checkpoint", "vllm"])
def test_tensor_parallel_ranks_are_bit_identical_with_packed_slices(
    root: Path, serve_unix: ServeUnix, layout: str
) -> None:
    server = serve_unix(root)
    assert server.server is not None
    with WeightClient(server.address) as client:
        ranks = []
        for rank in range(2):
            expected = client.fetch_state_dict(LLAMA, rank, 2, layout=layout, transport="grpc")
            views = client.fetch_state_dict(LLAMA, rank, 2, layout=layout, transport="shm", verify=True)
            assert_identical(views, expected)
            ranks.append(views)
        (entry,) = server.server.cache.open_entries()
        kinds = {key[0] for key in entry.segments.segments}
        assert "record" in kinds  # the small whole tensors and dim-0 slices: blocks of the files
        if layout == "vllm":
            assert "pack" in kinds  # fused and dim-1 sliced tensors, next to each other, packed
        del ranks, views
        gc.collect()
        wait_until(lambda: leased(server) == 0, "leases not released after the views died")


def test_descriptors_mappings_and_leases_return_to_the_baseline(root: Path, serve_unix: ServeUnix) -> None:
    server = serve_unix(root)
    with WeightClient(server.address) as client:
        for model in (MANY, PACKED):
            client.fetch_state_dict(model, transport="shm", copy=True)  # warm the channel and the plans
        gc.collect()
        wait_until(lambda: leased(server) == 0, "copy=True ends its lease at once")
        fds, mappings = open_fds(), segment_mappings()
        held = [client.fetch_state_dict(model, transport="shm") for model in (MANY, PACKED, MANY)]
        held.append(client.fetch_state_dict(MANY, transport="shm", names=["embed.weight", "layers.4.proj.bias"]))
        assert sum(map(len, held)) > 2 * SMALL
        assert 0 < segment_mappings() - mappings <= 3 * SEGMENT_BOUND  # a handful per fetch, not one per tensor
        assert leased(server) > 0
        del held
        gc.collect()
        assert segment_mappings() == mappings
        wait_until(lambda: leased(server) == 0, "leases not released after the views died")
        # The server runs in this process: its memfds and lease connections close as the leases end.
        wait_until(lambda: open_fds() <= fds, "descriptors left open after the views died")


def test_writing_into_a_view_changes_no_other_tensor_nor_a_later_fetch(
    root: Path, serve_unix: ServeUnix, over_grpc: dict[str, dict[str, torch.Tensor]]
) -> None:
    server = serve_unix(root, cache_memory=256 << 20)  # a budget: the same segments serve the second fetch
    with WeightClient(server.address) as client:
        for model in (MANY, PACKED):
            expected = over_grpc[model]
            first = client.fetch_state_dict(model, transport="shm")
            written = list(first)[3:6]  # a float32, a bfloat16 and an int8 tensor, each in a shared block
            for name in written:
                first[name].add_(1)
            for name in written:
                assert not first[name].equal(expected[name])
            assert_identical({n: t for n, t in first.items() if n not in written},
                             {n: t for n, t in expected.items() if n not in written})  # fmt: skip
            assert_identical(client.fetch_state_dict(model, transport="shm"), expected)


def test_a_pickled_small_view_where_a_large_tensor_starts_leaves_the_large_one_whole(
    serve_unix: ServeUnix, tmp_path: Path
) -> None:
    """A state dict holding the first rows of a fused tensor as a tensor of its own, listed before it."""
    root = tmp_path / "pickles"
    (root / PICKLE).mkdir(parents=True)
    fused = torch.arange(512 * 1024, dtype=torch.float32).reshape(1024, 512)  # 2 MiB
    torch.save({"bias": torch.ones(16), "q": fused[:8], "fused": fused}, root / PICKLE / "pytorch_model.bin")
    server = serve_unix(root)
    with WeightClient(server.address) as client:
        expected = client.fetch_state_dict(PICKLE, transport="grpc")
        assert_identical(client.fetch_state_dict(PICKLE, transport="shm"), expected)
