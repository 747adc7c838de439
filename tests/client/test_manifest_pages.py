"""GetManifest in pages: plans over gRPC's 4 MiB limit, page tokens, and errors that are not retried.

The big model has few tensors with long names (names may be up to 4 KiB): its plan
encodes to ~4.4 MB, over the 4 MiB an unpaged response may have, in ~0.1 s of writing,
where 100k realistic tensors would take seconds to write and tens of seconds to fetch.
The server's paging module (weightserve.server.manifest_pages) is tested here too, where
its client is.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.integration.faultkit import Background, assert_bit_identical, wait_until
from weightserve import AsyncWeightClient, FetchError, WeightClient
from weightserve.client import aio as client_aio
from weightserve.client import sync as client_sync
from weightserve.client.manifest_pages import ManifestPages
from weightserve.errors import InvalidRequestError, PreconditionError
from weightserve.server import manifest_pages as pages
from weightserve.server.stream_gate import RETRY_AFTER_SECONDS
from weightserve.testing import BackgroundServer
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(60)

BIG = "org/many"
COUNT = 1300
PAD = "w" * 3400
"""1300 names of ~3.4 KB: a plan of ~4.4 MB, two pages of at most 3 MiB."""
TINY = "org/tiny-llama"

ServeFn = Callable[..., BackgroundServer]


def write_many(model_dir: Path, seed: int = 0) -> None:
    """COUNT one-element F32 tensors with long names, valued seed * COUNT + i; written atomically."""
    model_dir.mkdir(parents=True, exist_ok=True)
    values = torch.arange(COUNT, dtype=torch.float32) + seed * COUNT
    tmp = model_dir / ".model.safetensors.tmp"
    save_file({f"{i:05d}.{PAD}": values[i : i + 1].clone() for i in range(COUNT)}, str(tmp))
    os.replace(tmp, model_dir / "model.safetensors")


@pytest.fixture(scope="module")
def many_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model root with org/many and org/many-b (the same file, another name: another manifest)."""
    root = tmp_path_factory.mktemp("many")
    write_many(root / BIG)
    (root / "org" / "many-b").mkdir()
    os.link(root / BIG / "model.safetensors", root / "org" / "many-b" / "model.safetensors")
    return root


@pytest.fixture
def big(many_root: Path, serve: ServeFn) -> str:
    return serve(many_root).address


@pytest.fixture
def stub(big: str) -> Iterator[pb_grpc.WeightServiceStub]:
    """A raw stub whose receive limit is far above 4 MiB, so any refusal is the server's."""
    with grpc.insecure_channel(big, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        yield pb_grpc.WeightServiceStub(channel)


def manifest_request(model: str, page_size: int = 0, page_token: str = "") -> pb.GetManifestRequest:
    return pb.GetManifestRequest(shard=pb.ShardSpec(model=model), page_size=page_size, page_token=page_token)


def count_pages(client: WeightClient, after_page: Callable[[pb.GetManifestRequest], None] | None = None) -> list[int]:
    """Spy on the client's GetManifest: the returned list gets each page's tensor count."""
    real, sizes = client._stub.GetManifest, []

    def spy(request: pb.GetManifestRequest, **kwargs: Any) -> pb.GetManifestResponse:
        page = real(request, **kwargs)
        sizes.append(len(page.tensors))
        if after_page is not None:
            after_page(request)
        return page

    client._stub.GetManifest = spy
    return sizes


# ------------------------------------------------------------------ the server


@pytest.mark.fault("manifest too big for one message")
def test_unpaged_manifest_over_4mib_is_failed_precondition_naming_page_size(
    stub: pb_grpc.WeightServiceStub,
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetManifest(manifest_request(BIG))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "page_size" in caught.value.details() and "4 MiB" in caught.value.details()


def test_pages_are_contiguous_slices_under_3mib_with_the_same_header(stub: pb_grpc.WeightServiceStub) -> None:
    first = stub.GetManifest(manifest_request(BIG, page_size=pages.MAX_PAGE_SIZE))
    second = stub.GetManifest(manifest_request(BIG, page_size=pages.MAX_PAGE_SIZE, page_token=first.next_page_token))
    assert first.next_page_token and not second.next_page_token
    assert len(first.tensors) + len(second.tensors) == COUNT
    assert [t.name[:5] for t in [*first.tensors, *second.tensors]] == [f"{i:05d}" for i in range(COUNT)]
    for page in (first, second):
        assert page.ByteSize() <= pages.PAGE_BYTES
        assert (page.manifest_id, page.revision, page.total_bytes, page.max_chunk_bytes, page.wire_version) == (
            first.manifest_id,
            first.revision,
            4 * COUNT,
            first.max_chunk_bytes,
            1,
        )


def test_old_clients_get_small_manifests_whole_and_page_size_bounds_the_count(model_root: Path, serve: ServeFn) -> None:
    with grpc.insecure_channel(serve(model_root).address) as channel:
        stub = pb_grpc.WeightServiceStub(channel)
        whole = stub.GetManifest(manifest_request(TINY))
        assert not whole.next_page_token and len(whole.tensors) > 5
        paged, token = [], ""
        while True:
            page = stub.GetManifest(manifest_request(TINY, page_size=5, page_token=token))
            assert len(page.tensors) <= 5 and page.manifest_id == whole.manifest_id
            paged.extend(page.tensors)
            if not (token := page.next_page_token):
                break
    assert paged == list(whole.tensors)


@pytest.mark.fault("model changed between manifest pages")
def test_a_page_token_of_another_manifest_is_refused(stub: pb_grpc.WeightServiceStub) -> None:
    token = stub.GetManifest(manifest_request(BIG, page_size=10)).next_page_token
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetManifest(manifest_request("org/many-b", page_size=10, page_token=token))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "changed" in caught.value.details() and "fetch the manifest again" in caught.value.details()
    with pytest.raises(grpc.RpcError) as forged:
        stub.GetManifest(manifest_request(BIG, page_size=10, page_token="not-a-token"))
    assert forged.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------ the client


@pytest.mark.fault("manifest too big for one message")
def test_the_client_pages_and_fetches_every_tensor_bit_identically(big: str, many_root: Path) -> None:
    with WeightClient(big) as client:
        sizes = count_pages(client)
        manifest = client.get_manifest(BIG)
        assert len(sizes) == 2 and sum(sizes) == COUNT
        assert manifest.ByteSize() > pages.UNPAGED_LIMIT and not manifest.next_page_token
        state = client.fetch_state_dict(BIG)
    assert_bit_identical(state, load_file(str(many_root / BIG / "model.safetensors")))


def test_the_async_client_pages_too(big: str, many_root: Path) -> None:
    async def main() -> tuple[pb.GetManifestResponse, dict[str, torch.Tensor]]:
        async with AsyncWeightClient(big) as client:
            return await client.get_manifest(BIG), await client.fetch_state_dict(BIG)

    manifest, state = asyncio.run(main())
    assert len(manifest.tensors) == COUNT
    assert_bit_identical(state, load_file(str(many_root / BIG / "model.safetensors")))


@pytest.mark.fault("model changed between manifest pages")
@pytest.mark.parametrize("changes", [1, 2])
def test_a_model_that_changes_between_pages_is_read_again_once(tmp_path: Path, serve: ServeFn, changes: int) -> None:
    model_dir = tmp_path / BIG
    write_many(model_dir)
    left = [changes]

    def change_after_first_page(request: pb.GetManifestRequest) -> None:
        if not request.page_token and left[0]:
            left[0] -= 1
            write_many(model_dir, seed=changes - left[0])

    with WeightClient(serve(tmp_path).address) as client:
        sizes = count_pages(client, change_after_first_page)
        if changes == 2:
            with pytest.raises(FetchError) as caught:
                client.fetch_state_dict(BIG)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value
            assert "changed" in str(caught.value)
            assert len(sizes) == 2  # two first pages; both second pages were refused
            return
        state = client.fetch_state_dict(BIG)
    assert len(sizes) == 3  # first page, first page again, second page
    assert_bit_identical(state, load_file(str(model_dir / "model.safetensors")))
    assert state[f"00000.{PAD}"].item() == COUNT  # the new weights (seed 1)


def test_manifest_pages_start_over_once_when_the_id_changes() -> None:
    def page(mid: str, names: list[str], token: str = "") -> pb.GetManifestResponse:
        return pb.GetManifestResponse(
            manifest_id=mid,
            tensors=[pb.TensorInfo(name=n, dtype="U8", shape=[0]) for n in names],
            next_page_token=token,
        )

    reader = ManifestPages("m", pb.ShardSpec(model="m"))
    reader.on_page(page("a", ["x"], "t1"))
    assert reader.next_request() == manifest_request("m", page_size=10_000, page_token="t1")
    reader.on_page(page("b", ["y"], "t2"))  # a server that does not check tokens
    assert reader.restarts == 1 and reader.next_request() == manifest_request("m", page_size=10_000)
    reader.on_page(page("b", ["x"], "t1"))
    reader.on_page(page("b", ["y"]))
    assert reader.next_request() is None
    assert [t.name for t in reader.result().tensors] == ["x", "y"]

    reader = ManifestPages("m", pb.ShardSpec(model="m"))
    reader.on_page(page("a", ["x"], "t1"))
    reader.on_error(FetchError("changed", grpc.StatusCode.FAILED_PRECONDITION))
    reader.on_page(page("b", ["x"], "t1"))
    with pytest.raises(FetchError) as caught:
        reader.on_page(page("c", ["y"]))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    first = ManifestPages("m", pb.ShardSpec(model="m"))
    with pytest.raises(FetchError):  # the first page's FAILED_PRECONDITION (a pinned revision) is final
        first.on_error(FetchError("pinned", grpc.StatusCode.FAILED_PRECONDITION))
    with pytest.raises(FetchError, match="empty page"):
        first.on_page(page("a", [], "t1"))


# --------------------------------------------------------- errors not retried


@pytest.mark.fault("manifest too big for one message")
@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_a_message_over_the_clients_receive_limit_is_not_retried(
    model_root: Path, serve: ServeFn, monkeypatch: pytest.MonkeyPatch, flavour: str
) -> None:
    key = "grpc.max_receive_message_length"
    for module in (client_sync, client_aio):
        small = [(k, v) for k, v in module.channel_options() if k != key] + [(key, 16384)]
        monkeypatch.setattr(module, "channel_options", lambda small=small: small)
    address = serve(model_root, chunk_bytes=65536).address

    def fetch_sync() -> Any:
        with WeightClient(address) as client:
            try:
                client.fetch_state_dict(TINY)
            finally:
                stats.append(client.last_stats)

    async def fetch_async() -> Any:
        async with AsyncWeightClient(address) as client:
            try:
                await client.fetch_state_dict(TINY)
            finally:
                stats.append(client.last_stats)

    stats: list[Any] = []
    with pytest.raises(FetchError) as caught:
        fetch_sync() if flavour == "sync" else asyncio.run(fetch_async())
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value
    assert "larger than max" in str(caught.value)
    assert stats[0].attempts == 1 and stats[0].reconnects == 0


def test_resource_exhausted_with_a_retry_after_hint_waits_that_long_and_resumes(
    model_root: Path, serve: ServeFn
) -> None:
    server = serve(model_root, chunk_bytes=4096, max_streams=1)
    with WeightClient(server.address) as holder, WeightClient(server.address) as client:
        manifest = holder.get_manifest(TINY)
        held = holder._fetch(pb.FetchShardRequest(shard=pb.ShardSpec(model=TINY), manifest_id=manifest.manifest_id))
        assert next(iter(held))  # the one stream slot is taken
        fetch = Background(lambda: client.fetch_state_dict(TINY))
        wait_until(lambda: client.last_stats is not None and client.last_stats.reconnects >= 1, 10, "a refusal")
        held.cancel()
        state = fetch.result(timeout=30)
        stats = client.last_stats
    assert state and stats is not None
    assert stats.attempts == 2
    assert stats.retry_wait_seconds >= RETRY_AFTER_SECONDS * 0.99, "the client did not honour retry-after-ms"


# -------------------------------------------------------- the server's paging module


class _Item:
    def __init__(self, size: int) -> None:
        self.size = size

    def ByteSize(self) -> int:  # protobuf's spelling
        return self.size


def test_page_tokens_round_trip_and_bad_ones_are_invalid_argument() -> None:
    token = pages.encode_token("abc123", 4242)
    assert pages.page_request(0, token) == pages.PageRequest(pages.MAX_PAGE_SIZE, "abc123", 4242)
    assert pages.page_request(10**9, "") == pages.PageRequest(pages.MAX_PAGE_SIZE)
    for bad in ("!!!", pages.encode_token("abc", 1)[:-2] + "==", "YWJj", "x" * 600):
        with pytest.raises(InvalidRequestError):
            pages.page_request(10, bad)
    request = pages.page_request(10, token)
    assert request.start_in("abc123", 5000) == 4242
    with pytest.raises(PreconditionError, match="changed"):
        request.start_in("other", 5000)
    with pytest.raises(InvalidRequestError):
        request.start_in("abc123", 100)


def test_take_bounds_a_page_by_bytes_and_count_and_refuses_big_unpaged_answers() -> None:
    items = [_Item(100_000)] * 100  # ~10 MB
    by_bytes = pages.take(pages.PageRequest(pages.MAX_PAGE_SIZE), items, 1000, "it")
    assert len(by_bytes) == (pages.PAGE_BYTES - 1000) // 100_004
    assert len(pages.take(pages.PageRequest(7), items, 0, "it")) == 7
    assert len(pages.take(pages.PageRequest(5), [_Item(pages.PAGE_BYTES * 2)], 0, "it")) == 1  # always progress
    assert len(pages.take(pages.PageRequest(), items[:40], 0, "it")) == 40
    with pytest.raises(PreconditionError, match="page_size"):
        pages.take(pages.PageRequest(), items, 0, "it")
