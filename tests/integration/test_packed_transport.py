"""Packed chunks (TRANSPORT_GRPC_PACKED) against real servers: the same bits as plain chunks.

Small whole tensors travel several to a message; larger ones, and a tensor resumed
mid-way, in chunks of their own. Whatever the mix (ranks, the vLLM layout's fused and
padded tensors, thousands of tiny tensors), a packed fetch returns exactly what a
plain one does, survives a severed stream and a flipped byte, falls back to plain
chunks on a server that does not pack, and shares the memory cache with plain fetches.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.integration.faultkit import (
    MID_MODEL,
    Background,
    Corruptor,
    FaultProxy,
    assert_bit_identical,
    load_checkpoint,
    wait_until,
)
from tests.server.test_observability import scrape, value
from weightserve.client import WeightClient
from weightserve.client.retry import RetryPolicy
from weightserve.server import proto_convert
from weightserve.testing import BackgroundServer, write_sharded_safetensors
from weightserve.v1 import weightserve_pb2 as pb

ServeFn = Callable[..., BackgroundServer]
LLAMA = "org/tiny-llama"
MANY = "org/many-small"
TENSORS = 2000
SMALL_CHUNK = 16384
"""Packs tensors up to 4 KiB: in the tiny Llama, norms, k/v and (sliced) q/o are packed, the MLP chunked."""
FRAMING_PER_TENSOR = 16
"""Bytes a tensor adds to a packed message beyond its data (index, size, crc32c), with room to spare."""
PATIENT = RetryPolicy(initial_backoff=0.01, max_backoff=0.05, retry_deadline=30)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def many_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """org/many-small: TENSORS tiny tensors of mixed dtypes (some empty) and three of 40 KB, in two files."""
    root = tmp_path_factory.mktemp("many")
    gen = torch.Generator().manual_seed(3)
    tensors: dict[str, torch.Tensor] = {}
    for n in range(TENSORS):
        size = int(torch.randint(0, 96, (), generator=gen)) if n % 97 else 0
        kind = n % 3
        if kind == 0:
            tensors[f"layers.{n}.weight"] = torch.randn(size, generator=gen)
        elif kind == 1:
            tensors[f"layers.{n}.bias"] = torch.randn(size, generator=gen).to(torch.bfloat16)
        else:
            tensors[f"layers.{n}.scale"] = torch.randint(-128, 128, (size,), generator=gen, dtype=torch.int8)
        if n % 700 == 350:
            tensors[f"layers.{n}.large"] = torch.randn(100, 100, generator=gen)
    write_sharded_safetensors(tensors, root / MANY, num_files=2)
    return root


def expected_messages(sizes: list[int], chunk_bytes: int) -> tuple[int, int]:
    """Messages a plain and a packed stream of tensors of `sizes` take: small tensors share
    messages of up to `chunk_bytes` (PACK_FRACTION 4), in order; the rest take their chunks."""
    plain = packed = 0
    room = -1  # bytes left in the open pack; -1: none open
    for n in sizes:
        chunks = max(1, -(-n // chunk_bytes))
        plain += chunks
        if n > chunk_bytes // 4:
            packed, room = packed + chunks, -1
        elif n <= room:
            room -= n
        else:
            packed, room = packed + 1, chunk_bytes - n
    return plain, packed


def fetch_messages(server: BackgroundServer) -> float:
    """FetchShard messages the server has sent so far."""
    return value(scrape(server), "grpc_server_msg_sent_total", grpc_method="FetchShard")


def counted_fetch(
    server: BackgroundServer, client: WeightClient, model: str, **options: object
) -> tuple[dict[str, torch.Tensor], int]:
    """fetch_state_dict, and the messages its streams took."""
    before = fetch_messages(server)
    state = client.fetch_state_dict(model, **options)  # type: ignore[arg-type]
    return state, int(fetch_messages(server) - before)


@pytest.mark.parametrize(
    ("world_size", "layout", "chunk"),
    [(1, "checkpoint", SMALL_CHUNK), (2, "checkpoint", SMALL_CHUNK), (4, "checkpoint", SMALL_CHUNK),
     (1, "vllm", 65536), (2, "vllm", 65536)],
)  # fmt: skip
def test_packed_equals_plain_chunks_for_every_rank(
    model_root: Path, serve: ServeFn, world_size: int, layout: str, chunk: int
) -> None:
    server = serve(model_root, chunk_bytes=chunk)
    with WeightClient(server.address) as client:
        for rank in range(world_size):
            manifest = client.get_manifest(LLAMA, rank, world_size, layout=layout)
            sizes = [t.nbytes for t in manifest.tensors]
            assert any(n <= chunk // 4 for n in sizes) and any(n > chunk // 4 for n in sizes), sizes
            packed, packed_messages = counted_fetch(server, client, LLAMA, rank=rank, world_size=world_size,
                                                    layout=layout, transport="packed")  # fmt: skip
            plain, plain_messages = counted_fetch(server, client, LLAMA, rank=rank, world_size=world_size,
                                                  layout=layout, transport="grpc")  # fmt: skip
            assert_bit_identical(packed, plain)
            assert (plain_messages, packed_messages) == expected_messages(sizes, chunk), rank
            assert packed_messages < plain_messages, rank
    if (world_size, layout) == (1, "checkpoint"):
        assert_bit_identical(packed, load_checkpoint(model_root / LLAMA))


def test_thousands_of_small_tensors_take_a_few_messages(many_root: Path, serve: ServeFn) -> None:
    server = serve(many_root, chunk_bytes=SMALL_CHUNK)
    with WeightClient(server.address) as client:
        total = client.get_manifest(MANY).total_bytes
        packed, packed_messages = counted_fetch(server, client, MANY, transport="packed")
        stats = client.last_fetch_stats
        plain, plain_messages = counted_fetch(server, client, MANY, transport="grpc")
        auto, _ = counted_fetch(server, client, MANY)  # "auto" over TCP packs too
    assert stats is not None and stats.tensors == len(packed) > TENSORS
    assert stats.payload_bytes == total and stats.attempts == 1
    assert plain_messages >= len(plain)
    # the data in messages of up to SMALL_CHUNK, plus a message or two for each large tensor
    assert packed_messages <= total // SMALL_CHUNK + 10, packed_messages
    assert packed_messages * 50 < len(packed), (packed_messages, len(packed))
    assert_bit_identical(packed, plain)
    assert_bit_identical(packed, load_checkpoint(many_root / MANY))
    assert_bit_identical(auto, plain)


@pytest.mark.fault("stream severed mid-way through packed messages", expect="resumed at the first unverified tensor")
@pytest.mark.parametrize("which", ["many-small", "mid-llama"])
def test_a_severed_packed_stream_resumes(
    many_root: Path, mid_root: Path, serve: ServeFn, proxy: Callable[..., FaultProxy], which: str
) -> None:
    root, model, chunk = (many_root, MANY, SMALL_CHUNK) if which == "many-small" else (mid_root, MID_MODEL, 262144)
    server = serve(root, chunk_bytes=chunk)
    link = proxy(server.server.port)  # type: ignore[union-attr]
    with WeightClient(link.address, retry=PATIENT) as client:
        before = link.s2c_bytes
        manifest = client.get_manifest(model)
        manifest_bytes = link.s2c_bytes - before  # fetch_state_dict asks for it again first
        total = manifest.total_bytes
        link.pause_after(link.s2c_bytes + manifest_bytes + total // 2)
        fetch = Background(lambda: client.fetch_state_dict(model, transport="packed"))
        assert link.paused.wait(20), "the stream never got half way"
        link.sever()
        wait_until(lambda: client.last_stats is not None and client.last_stats.reconnects >= 1, 20, "the break")
        assert client.last_stats is not None
        verified = client.last_stats.payload_bytes  # nothing more arrives while the proxy holds back
        link.resume()
        state = fetch.result(timeout=30)
        stats = client.last_stats

    assert_bit_identical(state, load_checkpoint(root / model))  # type: ignore[arg-type]
    assert 0 < verified < total, "the break did not land mid-stream"
    assert stats is not None and stats.reconnects >= 1
    assert stats.payload_bytes == total, "some tensors were accepted twice"
    bound = total - verified + chunk + FRAMING_PER_TENSOR * len(manifest.tensors)
    assert stats.bytes_after_reconnect <= bound, (
        f"after the break the client received {stats.bytes_after_reconnect} bytes for the {total - verified} "
        f"it lacked (bound {bound}): it did not resume where it stopped"
    )


@pytest.mark.fault("byte flipped in a packed message", expect="that tensor re-requested, the fetch bit-identical")
def test_a_flipped_byte_in_a_packed_message_is_refetched(
    many_root: Path, serve: ServeFn, proxy: Callable[..., FaultProxy]
) -> None:
    server = serve(many_root, chunk_bytes=SMALL_CHUNK)
    # message 1 is the manifest; from 3 on, the packs (each about SMALL_CHUNK long)
    corruptor = Corruptor.once(after=3, min_length=SMALL_CHUNK // 2)
    link = proxy(server.server.port, corruptor=corruptor)  # type: ignore[union-attr]
    with WeightClient(link.address) as client:
        state = client.fetch_state_dict(MANY, transport="packed")
        stats = client.last_stats
        total = client.get_manifest(MANY).total_bytes

    assert corruptor.flips == 1, f"the corruptor saw {corruptor.messages} messages and flipped none"
    assert stats is not None
    assert stats.integrity_retries == 1, stats
    assert stats.payload_bytes == total, "a tensor was accepted twice, or one from the damaged message kept"
    assert_bit_identical(state, load_checkpoint(many_root / MANY))


@pytest.mark.fault("server that does not speak TRANSPORT_GRPC_PACKED", expect="plain chunks instead")
def test_a_server_without_packing_gets_plain_chunks(
    model_root: Path, serve: ServeFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proto_convert, "_TRANSPORTS", proto_convert._TRANSPORTS - {pb.TRANSPORT_GRPC_PACKED})
    server = serve(model_root, chunk_bytes=SMALL_CHUNK)
    with WeightClient(server.address) as client:
        packed = client.fetch_state_dict(LLAMA, transport="packed")
        stats = client.last_stats
        auto = client.fetch_state_dict(LLAMA, rank=1, world_size=2)
        plain = client.fetch_state_dict(LLAMA, rank=1, world_size=2, transport="grpc")
    assert_bit_identical(packed, load_checkpoint(model_root / LLAMA))
    assert_bit_identical(auto, plain)
    assert stats is not None
    assert stats.attempts == 2 and stats.reconnects == 0, stats  # one refused stream, then plain chunks
    samples = scrape(server)
    assert value(samples, "grpc_server_handled_total", grpc_method="FetchShard", grpc_code="INVALID_ARGUMENT") == 2


@pytest.mark.parametrize("which", ["tiny-llama", "many-small"])
def test_packed_fetches_fill_and_use_the_memory_cache(
    model_root: Path, many_root: Path, serve: ServeFn, which: str
) -> None:
    root, model = (model_root, LLAMA) if which == "tiny-llama" else (many_root, MANY)
    server = serve(root, chunk_bytes=SMALL_CHUNK, cache_memory=64 << 20)

    def read_bytes() -> tuple[float, float]:
        """Payload bytes taken from the memory cache, and from anywhere else."""
        samples = scrape(server)
        cache = value(samples, "weightserve_read_bytes_total", source="cache")
        return cache, value(samples, "weightserve_read_bytes_total") - cache

    with WeightClient(server.address) as client:
        total = client.get_manifest(model).total_bytes
        start = read_bytes()
        cold = client.fetch_state_dict(model, transport="packed")
        after_cold = read_bytes()
        warm = client.fetch_state_dict(model, transport="packed")
        after_warm = read_bytes()
        plain = client.fetch_state_dict(model, transport="grpc")
        after_plain = read_bytes()

    assert after_cold[0] == start[0] and after_cold[1] - start[1] == total, (start, after_cold)
    # every tensor, packed or chunked, was kept as the chunk a plain stream asks for
    assert after_warm[0] - after_cold[0] == total and after_warm[1] == after_cold[1], (after_cold, after_warm)
    assert after_plain[0] - after_warm[0] == total and after_plain[1] == after_warm[1], (after_warm, after_plain)
    reference = load_checkpoint(root / model)
    for state in (cold, warm, plain):
        assert_bit_identical(state, reference)
