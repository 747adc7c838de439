"""Weight versions against a real server: publish, pin, deltas per rank, update in place, retention, scopes."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch

from tests.conftest import TINY_LLAMA, ServeFn
from weightserve.client import AsyncWeightClient, WeightClient
from weightserve.client import versions as client_versions
from weightserve.errors import FetchError, InvalidRequestError
from weightserve.server.tokens import token_digest
from weightserve.state.version_store import model_key
from weightserve.testing import BackgroundServer, write_llama_checkpoint
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc

MODEL = "org/tiny-llama"
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"  # column parallel: TP splits dim 0
DOWN = "model.layers.1.mlp.down_proj.weight"  # row parallel: TP splits dim 1
NORM = "model.norm.weight"  # replicated


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    write_llama_checkpoint(root / "org" / "tiny-llama", TINY_LLAMA, num_files=2)
    return root


@pytest.fixture
def server(root: Path, tmp_path: Path, serve: ServeFn) -> BackgroundServer:
    return serve(root, state_dir=tmp_path / "state", metrics_listen="off")


@pytest.fixture
def client(server: BackgroundServer) -> Iterator[WeightClient]:
    with WeightClient(server.address) as c:
        yield c


def fetch_error(call: object) -> FetchError:
    with pytest.raises(FetchError) as caught:
        call()  # type: ignore[operator]
    return caught.value


def test_a_publish_is_the_next_version_and_a_fetch_serves_the_latest_unless_pinned(client: WeightClient) -> None:
    v0 = client.fetch_state_dict(MODEL)
    changed = {NORM: v0[NORM] + 1, DOWN: v0[DOWN] * 2}
    assert client.publish(MODEL, changed) == 1
    assert client.publish(MODEL, {NORM: v0[NORM] + 2}) == 2

    latest = client.fetch_state_dict(MODEL)
    assert client.last_fetch_stats is not None and client.last_fetch_stats.version == 2
    assert latest[NORM].equal(v0[NORM] + 2) and latest[DOWN].equal(v0[DOWN] * 2)  # v2 is on v1
    assert latest[Q_PROJ].equal(v0[Q_PROJ])
    pinned = client.fetch_state_dict(MODEL, version=1)
    assert pinned[NORM].equal(v0[NORM] + 1) and pinned[DOWN].equal(v0[DOWN] * 2)
    assert all(client.fetch_state_dict(MODEL, version=0)[k].equal(v0[k]) for k in v0)
    assert re.search(r"\+v1\.[0-9a-f]{16}$", client.get_manifest(MODEL, version=1).revision)

    listed = client.list_versions(MODEL)
    assert [(v.version, v.base_version, v.tensors_published) for v in listed] == [(0, 0, 0), (1, 0, 2), (2, 1, 1)]
    assert listed[1].bytes_published == v0[NORM].nbytes + v0[DOWN].nbytes


def test_a_version_shares_unchanged_tensors_with_its_base_on_disk(client: WeightClient, tmp_path: Path) -> None:
    v0 = client.fetch_state_dict(MODEL)
    client.publish(MODEL, {NORM: v0[NORM] + 1})
    client.publish(MODEL, {NORM: v0[NORM] + 1, DOWN: v0[DOWN] + 1})  # the same NORM bytes again
    blobs = list((tmp_path / "state" / "versions" / model_key(MODEL) / "blobs").iterdir())
    assert sorted(b.stat().st_size for b in blobs) == sorted([v0[NORM].nbytes, v0[DOWN].nbytes])
    assert not list((tmp_path / "state" / "versions" / model_key(MODEL) / "uploads").iterdir())


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_since_version_sends_each_rank_only_its_changed_slices_and_update_matches_a_full_fetch(
    client: WeightClient, world_size: int
) -> None:
    v0 = client.fetch_state_dict(MODEL)
    rows = v0[Q_PROJ].shape[0]
    q = v0[Q_PROJ].clone()
    q[: rows // world_size] += 1  # only rank 0's slice of q_proj changes
    client.publish(MODEL, {Q_PROJ: q, DOWN: v0[DOWN] * 3, NORM: v0[NORM]})  # NORM republished unchanged

    for rank in range(world_size):
        held = client.fetch_state_dict(MODEL, rank, world_size, version=0)
        delta = client.fetch_state_dict(MODEL, rank, world_size, since_version=0)
        expected = {DOWN} | ({Q_PROJ} if rank == 0 else set())
        assert set(delta) == expected, (rank, sorted(delta))
        stats = client.last_fetch_stats
        assert stats is not None and stats.version == 1
        assert stats.payload_bytes == sum(held[name].nbytes for name in expected)

        assert client.update(held, MODEL, rank, world_size, since_version=0) == 1
        full = client.fetch_state_dict(MODEL, rank, world_size)
        assert sorted(held) == sorted(full) and all(held[k].equal(full[k]) for k in full)
        assert client.fetch_state_dict(MODEL, rank, world_size, since_version=1) == {}


def test_update_writes_into_a_modules_own_tensors_in_place(client: WeightClient) -> None:
    v0 = client.fetch_state_dict(MODEL)
    module = torch.nn.Module()
    module.norm = torch.nn.Parameter(v0[NORM].clone())  # type: ignore[assignment]
    storage = module.norm.data_ptr()
    client.publish(MODEL, {NORM: v0[NORM] + 5})
    done = client.update({NORM: module.norm}, MODEL, since_version=0, names=[NORM])
    assert done == 1 and module.norm.data_ptr() == storage and module.norm.equal(v0[NORM] + 5)


@pytest.mark.fault("update whose delta does not fit the targets", expect="refused before any tensor is written")
def test_a_delta_that_does_not_fit_the_targets_changes_nothing(client: WeightClient) -> None:
    v0 = client.fetch_state_dict(MODEL)
    client.publish(MODEL, {NORM: v0[NORM] + 1, DOWN: v0[DOWN] + 1})
    held = {NORM: v0[NORM].clone(), DOWN: v0[DOWN][:, :8].clone()}  # DOWN of another shape
    before = {k: t.clone() for k, t in held.items()}
    with pytest.raises(InvalidRequestError, match="nothing written"):
        client.update(held, MODEL, since_version=0)
    assert all(held[k].equal(before[k]) for k in held)
    with pytest.raises(InvalidRequestError, match="not in the target"):
        client_versions.apply_update({NORM: held[NORM]}, {DOWN: v0[DOWN]}, MODEL)


@pytest.mark.fault(
    "publish of an unknown tensor, another dtype or shape, a missing base",
    expect="INVALID_ARGUMENT or FAILED_PRECONDITION naming it; no version appears",
)
def test_publishing_checks_names_dtypes_and_shapes_against_the_checkpoint(client: WeightClient) -> None:
    v0 = client.fetch_state_dict(MODEL)
    cases = {
        "model.layers.9.mlp.up_proj.weight": (v0[NORM], "has no tensor"),
        NORM: (v0[NORM].to(torch.float64), "a version changes values, not shapes"),
        DOWN: (v0[DOWN][:, :4], "a version changes values, not shapes"),
    }
    for name, (tensor, message) in cases.items():
        error = fetch_error(lambda n=name, t=tensor: client.publish(MODEL, {n: t}))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and message in str(error), (name, error)
    error = fetch_error(lambda: client.publish(MODEL, {NORM: v0[NORM]}, base=7))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "no version 7" in str(error)
    assert fetch_error(lambda: client.publish("org/none", {NORM: v0[NORM]})).code() == grpc.StatusCode.NOT_FOUND
    assert fetch_error(lambda: client.fetch_state_dict(MODEL, version=3)).code() == grpc.StatusCode.FAILED_PRECONDITION
    assert fetch_error(lambda: client.publish(MODEL, {})).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.version for v in client.list_versions(MODEL)] == [0]


def test_without_a_state_dir_there_is_only_the_checkpoint(root: Path, serve: ServeFn) -> None:
    with WeightClient(serve(root, metrics_listen="off").address) as client:
        v0 = client.fetch_state_dict(MODEL, names=[NORM])
        for call in (
            lambda: client.publish(MODEL, v0),
            lambda: client.fetch_state_dict(MODEL, since_version=0),
            lambda: client.fetch_state_dict(MODEL, version=1),
        ):
            error = fetch_error(call)
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "--state-dir" in str(error)
        assert client.fetch_state_dict(MODEL, version=0)[NORM].equal(v0[NORM])
        assert [v.version for v in client.list_versions(MODEL)] == [0]


def test_concurrent_publishes_of_one_model_get_consecutive_versions_each_whole(client: WeightClient) -> None:
    v0 = client.fetch_state_dict(MODEL)
    results: dict[int, int] = {}
    errors: list[BaseException] = []

    def publish(i: int) -> None:
        try:
            results[i] = client.publish(MODEL, {NORM: v0[NORM] + i, DOWN: v0[DOWN] + i}, base=0, chunk_bytes=1024)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and sorted(results.values()) == [1, 2, 3, 4]
    for i, version in results.items():
        got = client.fetch_state_dict(MODEL, version=version, names=[NORM, DOWN])
        assert got[NORM].equal(v0[NORM] + i) and got[DOWN].equal(v0[DOWN] + i)


@pytest.mark.fault(
    "upload stream ended early", expect="GetPublish says where it stands; the rest is sent once and commits"
)
def test_a_broken_upload_resumes_where_the_server_is_without_resending(
    server: BackgroundServer, client: WeightClient
) -> None:
    v0 = client.fetch_state_dict(MODEL, names=[NORM, DOWN])
    new = {NORM: v0[NORM] - 1, DOWN: v0[DOWN] + 1}
    tensors = client_versions.outgoing(new)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.VersionServiceStub(channel)
        upload_id = stub.StartPublish(client_versions.start_request(MODEL, tensors, None)).upload_id
        stream = list(client_versions.upload_requests(upload_id, tensors, [0, 0], chunk_bytes=1000))
        half = stream[: len(stream) // 2]  # the stream ends early: no commit
        cut = stub.PublishVersion(iter(half))
        assert not cut.committed and [v.version for v in client.list_versions(MODEL)] == [0]
        status = stub.GetPublish(pb.GetPublishRequest(upload_id=upload_id))
        sent = sum(len(r.chunk.data) for r in half)
        assert sum(status.received) == sent > 0 and list(status.received) == list(cut.received)

        rest = list(client_versions.upload_requests(upload_id, tensors, status.received, chunk_bytes=1000))
        assert sum(len(r.chunk.data) for r in rest) == sum(t.nbytes for t in tensors) - sent
        done = stub.PublishVersion(iter(rest))
        assert done.committed and done.version == 1
        again = stub.GetPublish(pb.GetPublishRequest(upload_id=upload_id))  # the answer was lost: ask again
        assert again.committed and again.version == 1
    got = client.fetch_state_dict(MODEL, names=[NORM, DOWN])
    assert got[NORM].equal(new[NORM]) and got[DOWN].equal(new[DOWN])


@pytest.mark.fault(
    "upload chunk failing its checksum, or a bogus upload id",
    expect="DATA_LOSS, nothing of it kept; NOT_FOUND or INVALID_ARGUMENT for the id",
)
def test_a_chunk_that_fails_its_checksum_is_refused_and_not_kept(server: BackgroundServer) -> None:
    with WeightClient(server.address) as c:
        norm = c.fetch_state_dict(MODEL, names=[NORM])[NORM]
    tensors = client_versions.outgoing({NORM: norm + 1})
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.VersionServiceStub(channel)
        upload_id = stub.StartPublish(client_versions.start_request(MODEL, tensors, None)).upload_id
        requests = list(client_versions.upload_requests(upload_id, tensors, [0]))
        requests[0].chunk.crc32c ^= 1
        with pytest.raises(grpc.RpcError) as caught:
            stub.PublishVersion(iter(requests))
        assert caught.value.code() == grpc.StatusCode.DATA_LOSS
        assert list(stub.GetPublish(pb.GetPublishRequest(upload_id=upload_id)).received) == [0]
        for bogus in ("", "../../etc", "f" * 32, "x" * 10_000):
            with pytest.raises(grpc.RpcError) as caught:
                stub.GetPublish(pb.GetPublishRequest(upload_id=bogus))
            assert caught.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), bogus


@pytest.mark.fault(
    "stored version corrupted on disk",
    expect="DATA_LOSS naming the tensor; an update changes nothing; version 0 serves",
)
def test_a_corrupted_stored_version_is_data_loss_and_never_applied(client: WeightClient, tmp_path: Path) -> None:
    v0 = client.fetch_state_dict(MODEL)
    client.publish(MODEL, {NORM: v0[NORM] + 1})
    (blob,) = (tmp_path / "state" / "versions" / model_key(MODEL) / "blobs").iterdir()
    data = bytearray(blob.read_bytes())
    data[3] ^= 0x40
    blob.write_bytes(bytes(data))
    held = {k: t.clone() for k, t in v0.items()}
    error = fetch_error(lambda: client.update(held, MODEL, since_version=0))
    assert error.code() == grpc.StatusCode.DATA_LOSS and NORM in str(error)
    assert all(held[k].equal(v0[k]) for k in v0)
    assert fetch_error(lambda: client.fetch_state_dict(MODEL)).code() == grpc.StatusCode.DATA_LOSS
    assert client.fetch_state_dict(MODEL, version=0)[NORM].equal(v0[NORM])  # the checkpoint still serves


def test_watch_versions_streams_each_new_version_and_its_lease_holds_off_retention(
    root: Path, tmp_path: Path, serve: ServeFn
) -> None:
    server = serve(root, state_dir=tmp_path / "state", max_versions=1, metrics_listen="off")
    with WeightClient(server.address) as client:
        norm = client.fetch_state_dict(MODEL, names=[NORM])[NORM]
        assert client.publish(MODEL, {NORM: norm + 1}) == 1
        seen: list[int] = []
        watch = client.watch_versions(MODEL, after_version=1, serving_version=1)
        first = threading.Event()

        def follow() -> None:
            for info in watch:
                seen.append(info.version)
                first.set()
                if len(seen) == 2:
                    return

        follower = threading.Thread(target=follow)
        follower.start()
        wait_for(lambda: client.list_versions(MODEL)[1].leases == 1, "the watcher's lease")
        assert client.publish(MODEL, {NORM: norm + 2}) == 2
        assert first.wait(20)
        assert client.publish(MODEL, {NORM: norm + 3}) == 3
        follower.join(20)
        assert seen == [2, 3]
        assert [v.version for v in client.list_versions(MODEL)] == [0, 1, 3]  # 1 is leased, 2 dropped
        assert client.fetch_state_dict(MODEL, version=1, names=[NORM])[NORM].equal(norm + 1)
        watch.close()  # the lease ends with the stream
        wait_for(lambda: client.list_versions(MODEL)[1].leases == 0, "the lease to end")
        assert client.publish(MODEL, {NORM: norm + 4}) == 4
        assert [v.version for v in client.list_versions(MODEL)] == [0, 4]
        blobs = tmp_path / "state" / "versions" / model_key(MODEL) / "blobs"
        assert len(list(blobs.iterdir())) == 1


def wait_for(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_publishing_needs_the_publish_scope(root: Path, tmp_path: Path, serve: ServeFn) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        f'[[tokens]]\nname = "workers"\nsha256 = "{token_digest("w-s3cret")}"\nmodels = ["org/*"]\n'
        f'[[tokens]]\nname = "trainer"\nsha256 = "{token_digest("t-s3cret")}"\nmodels = ["org/*"]\npublish = true\n'
    )
    server = serve(root, state_dir=tmp_path / "state", auth_tokens=tokens, metrics_listen="off")
    worker, trainer = WeightClient(server.address, token="w-s3cret"), WeightClient(server.address, token="t-s3cret")
    with worker, trainer:
        norm = worker.fetch_state_dict(MODEL, names=[NORM])[NORM]
        error = fetch_error(lambda: worker.publish(MODEL, {NORM: norm + 1}))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "publish" in str(error)
        assert trainer.publish(MODEL, {NORM: norm + 1}) == 1
        assert worker.fetch_state_dict(MODEL, since_version=0, names=[NORM])[NORM].equal(norm + 1)
        assert [v.version for v in worker.list_versions(MODEL)] == [0, 1]


def test_the_asyncio_client_publishes_watches_and_updates(server: BackgroundServer) -> None:
    async def run() -> None:
        async with AsyncWeightClient(server.address) as client:
            v0 = await client.fetch_state_dict(MODEL, 0, 2)
            norm = v0[NORM]
            watch = client.watch_versions(MODEL, after_version=0, serving_version=0)
            first = asyncio.ensure_future(anext(watch))
            assert await client.publish(MODEL, {NORM: norm * 2}) == 1
            assert (await asyncio.wait_for(first, 20)).version == 1
            await watch.aclose()
            held = {k: t.clone() for k, t in v0.items()}
            assert await client.update(held, MODEL, 0, 2, since_version=0) == 1
            assert held[NORM].equal(norm * 2)
            assert [v.version for v in await client.list_versions(MODEL)] == [0, 1]

    asyncio.run(run())


def test_prefetch_warms_the_latest_version(client: WeightClient, server: BackgroundServer) -> None:
    v0 = client.fetch_state_dict(MODEL, names=[NORM])
    client.publish(MODEL, {NORM: v0[NORM] + 1})
    client.prefetch(MODEL, world_size=2, wait=True)
    revisions = {entry.revision for entry in server.server.cache.open_entries()}  # type: ignore[union-attr]
    assert any(re.search(r"\+v1\.[0-9a-f]{16}$", revision) for revision in revisions), revisions


def test_one_changed_byte_past_the_first_compared_block_is_found(
    client: WeightClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from weightserve.server import deltas

    monkeypatch.setattr(deltas, "COMPARE_BLOCK", 64)  # many blocks per slice: the change sits in a late one
    v0 = client.fetch_state_dict(MODEL, names=[DOWN])[DOWN]
    down = v0.clone()
    down[-1, -1] += 1  # the last column: rank 1's slice of a row-parallel weight at TP 2
    client.publish(MODEL, {DOWN: down})
    assert client.fetch_state_dict(MODEL, 0, 2, since_version=0) == {}
    assert set(client.fetch_state_dict(MODEL, 1, 2, since_version=0)) == {DOWN}


@pytest.mark.fault("model name or symlink escaping the roots", cases=5)
def test_versions_of_a_model_that_does_not_exist_are_not_found_at_once(client: WeightClient) -> None:
    for name in ("org/does-not-exist", "../../etc", "org/tiny-llama/../..", ".", "org/" + "x" * 300):
        error = fetch_error(lambda name=name: client.list_versions(name))
        assert error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), error
        watch = client.watch_versions(name, serving_version=0)
        with pytest.raises(FetchError) as refused:  # at once, not a wait that never ends
            next(iter(watch))
        assert refused.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    assert [v.version for v in client.list_versions(MODEL)] == [0]
