"""The same-host shared-memory transport, against real servers on Unix sockets.

Bit-identical to the gRPC path for every rank and layout; sealed segments mapped
MAP_PRIVATE; segments shared between ranks and leased by connections that a dying
client or server ends; descriptors never leak; tokens apply; TCP falls back to chunks.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch

from tests.integration.shmkit import ServeUnix, leased, open_fds, wait_until
from tests.server.test_security import CONTROLLER, WORKERS, write_tokens
from weightserve.client import AsyncWeightClient, WeightClient
from weightserve.client import shm as client_shm
from weightserve.errors import FetchError
from weightserve.server import fd_handoff
from weightserve.testing import BackgroundServer, LlamaShape, write_llama_checkpoint
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc

MODEL = "org/tiny-llama"
SHAPE = LlamaShape(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=200)  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_llama_checkpoint(root / MODEL, SHAPE, num_files=2)
    write_llama_checkpoint(root / "secret" / "tiny-llama", SHAPE, num_files=1, seed=1)
    return root


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a)


@pytest.mark.parametrize(("world_size", "layout"), [(1, "checkpoint"), (2, "checkpoint"), (4, "vllm")])
def test_every_rank_is_bit_identical_to_the_grpc_path(
    root: Path, serve_unix: ServeUnix, world_size: int, layout: str
) -> None:
    server = serve_unix(root)
    with WeightClient(server.address) as client:
        for rank in range(world_size):
            chunks = client.fetch_state_dict(MODEL, rank, world_size, layout=layout, transport="grpc")
            views = client.fetch_state_dict(MODEL, rank, world_size, layout=layout, verify=True)  # auto: shm
            assert client.last_fetch_stats is not None and client.last_fetch_stats.bytes_received == 0
            copies = client.fetch_state_dict(MODEL, rank, world_size, layout=layout, transport="shm", copy=True)
            assert equal(chunks, views) and equal(chunks, copies)
            names = sorted(chunks)[:3]
            assert equal(client.fetch_state_dict(MODEL, rank, world_size, layout=layout, names=names),
                         {n: chunks[n] for n in names})  # fmt: skip


def test_views_are_copy_on_write_and_copies_are_the_callers_own(root: Path, serve_unix: ServeUnix) -> None:
    server = serve_unix(root, cache_memory=256 << 20)
    with WeightClient(server.address) as client:
        first = client.fetch_state_dict(MODEL)
        original = first["model.norm.weight"].clone()
        first["model.norm.weight"].add_(1.0)  # a private page now; the segment is sealed and unchanged
        second = client.fetch_state_dict(MODEL)
        assert second["model.norm.weight"].equal(original)
        copy = client.fetch_state_dict(MODEL, copy=True, dtype=torch.float32)
        assert copy["model.norm.weight"].dtype == torch.float32
        assert copy["model.norm.weight"].equal(original.float())


def segment_pages() -> dict[str, tuple[int, int, int]]:
    """This process's mappings of weightserve memfds: address range -> (size, resident, anonymous) in KiB.

    A page written through a MAP_PRIVATE mapping becomes an anonymous copy; the segment's own pages do not.
    """
    out: dict[str, tuple[int, int, int]] = {}
    current: str | None = None
    fields: dict[str, int] = {}
    with open("/proc/self/smaps") as smaps:
        for line in [*smaps, "end-0 "]:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):  # a mapping's first line
                if current is not None:
                    out[current] = (fields["Size"], fields["Rss"], fields["Anonymous"])
                current = head if "memfd:weightserve:" in line else None
                fields = {}
            elif current is not None and head.endswith(":") and line.split()[1].isdigit():
                fields[head[:-1]] = int(line.split()[1])
    return out


@pytest.mark.parametrize(("world_size", "piece"), [(1, client_shm.POPULATE_PIECE), (1, 2 * 4096), (4, 2 * 4096)])
def test_views_arrive_with_their_pages_mapped_and_none_copied(
    root: Path, serve_unix: ServeUnix, monkeypatch: pytest.MonkeyPatch, world_size: int, piece: int
) -> None:
    """The rank's bytes are populated before the fetch returns (read-only, on threads, in pieces): nothing
    faults in on first use, no page became a private copy, and a rank maps in only its share of the
    segments every rank maps whole.

    The share is checked on the ranges asked of the kernel: resident pages may exceed them, since a
    read fault also maps up to 64 KiB of neighbouring pages already in memory (fault-around), which on
    a model this small is most of every segment."""
    monkeypatch.setattr(client_shm, "POPULATE_PIECE", piece)
    asked: list[int] = []
    populate = client_shm.populate_range

    def recorded(address: int, nbytes: int, advice: int) -> None:
        asked.append(nbytes)
        populate(address, nbytes, advice)

    monkeypatch.setattr(client_shm, "populate_range", recorded)
    server = serve_unix(root)
    held = []  # every rank's views stay alive: no mapping's address is reused by the next
    with WeightClient(server.address) as client:
        for rank in range(world_size):
            before = set(segment_pages())
            asked.clear()
            views = client.fetch_state_dict(MODEL, rank, world_size, transport="shm")
            held.append(views)
            new = {k: v for k, v in segment_pages().items() if k not in before}
            assert new, "no segment is mapped"
            resident = 1024 * sum(r for _, r, _ in new.values())
            share = sum(t.nbytes for t in views.values())
            assert sum(asked) == share, "populate asked for other bytes than the rank's own"
            assert max(asked) <= piece
            assert resident >= share
            assert sum(copied for _, _, copied in new.values()) == 0
            if world_size == 1:
                assert all(resident == size for size, resident, _ in new.values())
        next(iter(held[0].values())).view(torch.uint8)[0] ^= 1  # the check sees a copy-on-write page
        assert sum(copied for _, _, copied in segment_pages().values()) == 4


@pytest.mark.fault("shared-memory segment unsealed, resized or mislabelled")
def test_an_unsealed_or_resized_descriptor_is_refused(tmp_path: Path) -> None:
    lease = client_shm.Lease(__import__("socket").socket())
    for seals, size in ((0, 4096), (client_shm.REQUIRED_SEALS, 8192)):
        fd = os.memfd_create("test", os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, 4096)
        if seals:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        with pytest.raises(FetchError) as info:
            client_shm.map_segments([fd], [size], lease)
        assert info.value.code() == grpc.StatusCode.DATA_LOSS
        with pytest.raises(OSError):
            os.fstat(fd)  # closed either way
    lease.close()


def test_segments_are_sealed_shared_between_ranks_and_released_with_the_last_view(
    root: Path, serve_unix: ServeUnix
) -> None:
    server = serve_unix(root)
    assert server.server is not None
    with WeightClient(server.address) as client:
        ranks = [client.fetch_state_dict(MODEL, rank, 2) for rank in range(2)]
        (entry,) = server.server.cache.open_entries()
        kinds = {key[0] for key in entry.segments.segments}
        assert kinds == {"record", "pieces"}  # dim-0 slices share the whole tensor's segment; dim-1 slices not
        checkpoint = sum(p.stat().st_size for p in (root / MODEL).glob("*.safetensors"))
        record_bytes = sum(s.size for k, s in entry.segments.segments.items() if k[0] == "record")
        assert record_bytes < checkpoint  # each checkpoint tensor at most once, for both ranks
        for segment in entry.segments.segments.values():
            seals = fcntl.fcntl(segment.fd, fcntl.F_GET_SEALS)
            assert seals & client_shm.REQUIRED_SEALS == client_shm.REQUIRED_SEALS
        assert leased(server) > 0
        del ranks
        gc.collect()
        wait_until(lambda: leased(server) == 0, "leases not released after the views died")
        assert entry.segments.nbytes == 0  # no budget: released with the last lease


def test_a_budget_keeps_idle_segments_and_counts_them(root: Path, serve_unix: ServeUnix) -> None:
    server = serve_unix(root, cache_memory=256 << 20)
    assert server.server is not None
    with WeightClient(server.address) as client:
        client.fetch_state_dict(MODEL, copy=True)
        (entry,) = server.server.cache.open_entries()
        wait_until(lambda: leased(server) == 0, "copy=True ends its lease at once")
        assert entry.segments.nbytes > 0 and server.server.cache.budget.resident() >= entry.segments.nbytes
        built = len(entry.segments.segments)
        client.fetch_state_dict(MODEL, copy=True)
        assert len(entry.segments.segments) == built  # served from the kept segments


def test_descriptors_never_leak_in_either_process(root: Path, tmp_path: Path) -> None:
    from tests.integration.faultkit import ServerProcess, free_port

    socket_path = tmp_path / "ws.sock"
    server = ServerProcess(root, free_port(), tmp_path, "--listen", f"unix:{socket_path}")
    server.address = f"unix:{socket_path}"
    server.start()
    assert server.proc is not None
    server_fds = Path(f"/proc/{server.proc.pid}/fd")
    try:
        with WeightClient(server.address) as client:
            client.fetch_state_dict(MODEL, copy=True)  # warm everything up once
            gc.collect()
            client_before, server_before = open_fds(), len(os.listdir(server_fds))
            for _ in range(5):
                state = client.fetch_state_dict(MODEL, 0, 2)
                assert state
                del state
                client.fetch_state_dict(MODEL, 1, 2, copy=True)
            gc.collect()
            wait_until(lambda: len(os.listdir(server_fds)) <= server_before, "server descriptors leaked")
            assert open_fds() <= client_before
    finally:
        server.stop()


HOLDER = """
import sys, time
from weightserve.client import WeightClient
state = WeightClient(sys.argv[1]).fetch_state_dict(sys.argv[2])
print(len(state), flush=True)
time.sleep(600)
"""


@pytest.mark.fault("client killed while holding shared-memory segments")
def test_a_client_killed_while_holding_segments_releases_them(root: Path, serve_unix: ServeUnix) -> None:
    server = serve_unix(root)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, server.address, MODEL], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and int(holder.stdout.readline()) > 0
        assert leased(server) > 0
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
        wait_until(lambda: leased(server) == 0, "a dead client's lease was kept")
    finally:
        holder.kill()


@pytest.mark.fault("server gone while clients hold shared-memory segments")
def test_tensors_stay_valid_after_the_server_stops(root: Path, serve_unix: ServeUnix) -> None:
    server = serve_unix(root)
    with WeightClient(server.address) as client:
        expected = client.fetch_state_dict(MODEL, transport="grpc")
        views = client.fetch_state_dict(MODEL)
    server.stop()
    gc.collect()
    assert equal(views, expected)  # the mappings outlive the server and its descriptors
    views["model.norm.weight"].mul_(2)  # still privately writable


@pytest.mark.fault("missing, unknown or out-of-scope token")
def test_tokens_apply_and_a_ticket_is_good_once(root: Path, serve_unix: ServeUnix, tmp_path: Path) -> None:
    server = serve_unix(root, auth_tokens=write_tokens(tmp_path / "tokens.toml"))
    with WeightClient(server.address, token=WORKERS) as client:
        assert client.fetch_state_dict(MODEL)
        with pytest.raises(FetchError) as info:
            client.fetch_state_dict("secret/tiny-llama")
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        manifest = client.get_manifest(MODEL)
        request = pb.FetchShardSegmentsRequest(shard=pb.ShardSpec(model=MODEL), manifest_id=manifest.manifest_id)
        grant = client._stub.FetchShardSegments(request)
    with WeightClient(server.address, token=CONTROLLER) as other:
        assert other.fetch_state_dict("secret/tiny-llama")
    lease, fds = client_shm.redeem(grant.handoff_socket, grant.ticket, len(grant.segments), 10)
    for fd in fds:
        os.close(fd)
    lease.close()
    with pytest.raises(FetchError) as info:
        client_shm.redeem(grant.handoff_socket, grant.ticket, len(grant.segments), 10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "used or expired ticket" in str(info.value)
    wait_until(lambda: leased(server) == 0, "leases kept after the redeemed lease closed")


def test_an_unredeemed_ticket_expires_and_releases_its_segments(
    root: Path, serve_unix: ServeUnix, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fd_handoff, "TICKET_SECONDS", 0.2)
    server = serve_unix(root)
    with WeightClient(server.address) as client:
        manifest = client.get_manifest(MODEL)
        request = pb.FetchShardSegmentsRequest(shard=pb.ShardSpec(model=MODEL), manifest_id=manifest.manifest_id)
        grant = client._stub.FetchShardSegments(request)
    assert leased(server) > 0
    wait_until(lambda: leased(server) == 0, "an expired ticket kept its segments")
    with pytest.raises(FetchError):
        client_shm.redeem(grant.handoff_socket, grant.ticket, len(grant.segments), 10)


def test_over_tcp_shared_memory_falls_back_to_chunks_saying_so_once(
    root: Path, serve: Callable[..., BackgroundServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = serve(root)
    with caplog.at_level(logging.INFO, logger="weightserve.client"), WeightClient(server.address) as client:
        expected = client.fetch_state_dict(MODEL, transport="grpc")
        for _ in range(2):
            assert equal(client.fetch_state_dict(MODEL, transport="shm"), expected)
        assert equal(client.fetch_state_dict(MODEL), expected)  # auto over TCP: chunks, nothing to say
    said = [r.getMessage() for r in caplog.records if "streaming chunks" in r.getMessage()]
    assert len(said) == 1 and "is TCP" in said[0]
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.WeightServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.FetchShardSegments(pb.FetchShardSegmentsRequest(shard=pb.ShardSpec(model=MODEL)))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        request = pb.FetchShardRequest(shard=pb.ShardSpec(model=MODEL), transport=pb.TRANSPORT_SHARED_MEMORY)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.FetchShard(request))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "FetchShardSegments" in info.value.details()


def test_a_bad_transport_name_is_refused_before_any_call(root: Path, serve_unix: ServeUnix) -> None:
    server = serve_unix(root)
    with WeightClient(server.address) as client, pytest.raises(ValueError, match="transport 'rdma' must be one of"):
        client.fetch_state_dict(MODEL, transport="rdma")


def test_the_asyncio_client_receives_segments_too(root: Path, serve_unix: ServeUnix) -> None:
    import asyncio

    server = serve_unix(root)

    async def run() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        async with AsyncWeightClient(server.address) as client:
            return await client.fetch_state_dict(MODEL, transport="grpc"), await client.fetch_state_dict(MODEL)

    chunks, views = asyncio.run(run())
    assert equal(chunks, views)


def test_both_clients_stream_chunks_from_a_server_that_grants_no_segments(
    root: Path, serve_unix: ServeUnix, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A server on a Unix socket that refuses FetchShardSegments as one without shared memory does: the
    fetch streams chunks instead, says why, and leaves nothing running (the asyncio client's name list)."""
    import asyncio

    from weightserve.errors import PreconditionError
    from weightserve.server.segment_plane import SegmentPlane

    server = serve_unix(root)
    with WeightClient(server.address) as client:
        expected = client.fetch_state_dict(MODEL, transport="grpc")

    async def refuse(*args: object) -> None:
        raise PreconditionError("shared memory needs a server listening on a Unix socket (--listen unix:PATH)")

    monkeypatch.setattr(SegmentPlane, "grant", refuse)

    async def run() -> dict[str, torch.Tensor]:
        async with AsyncWeightClient(server.address) as client:
            state = await client.fetch_state_dict(MODEL)
        assert {t.get_name() for t in asyncio.all_tasks()} == {asyncio.current_task().get_name()}
        return state

    with caplog.at_level(logging.INFO, logger="weightserve.client"):
        with WeightClient(server.address) as client:
            assert equal(client.fetch_state_dict(MODEL), expected)
            assert client.last_fetch_stats is not None and client.last_fetch_stats.bytes_received > 0
        assert equal(asyncio.run(run()), expected)
    assert sum("does not serve shared memory" in r.getMessage() for r in caplog.records) == 2


def test_load_into_writes_shared_memory_into_the_modules_tensors(root: Path, serve_unix: ServeUnix) -> None:
    server = serve_unix(root)
    with WeightClient(server.address) as client:
        expected = client.fetch_state_dict(MODEL, transport="grpc")
        module = torch.nn.Module()
        for name, tensor in expected.items():
            parent = module
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            parent.register_buffer(leaf, torch.zeros_like(tensor))
        before = {n: b.data_ptr() for n, b in module.named_buffers()}
        client.load_into(module, MODEL)
        assert all(b.data_ptr() == before[n] and b.equal(expected[n]) for n, b in module.named_buffers())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_shared_memory_to_a_gpu_goes_through_the_pinned_ring(root: Path, serve_unix: ServeUnix) -> None:
    server = serve_unix(root)
    with WeightClient(server.address) as client:
        expected = client.fetch_state_dict(MODEL, transport="grpc")
        on_gpu = client.fetch_state_dict(MODEL, device="cuda:0")
        assert all(t.device.type == "cuda" for t in on_gpu.values())
        assert equal({k: v.cpu() for k, v in on_gpu.items()}, expected)
        gc.collect()
        wait_until(lambda: leased(server) == 0, "a GPU fetch keeps no lease")


def test_socket_mode_sets_the_permissions_of_both_sockets(root: Path, serve_unix: ServeUnix) -> None:
    server = serve_unix(root, socket_mode="0660")
    path = Path(server.address.removeprefix("unix:"))
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (path, path.with_name(path.name + ".fds"))}
    assert set(modes.values()) == {0o660}, modes
    with WeightClient(server.address) as client:
        assert client.fetch_state_dict(MODEL, transport="shm")


@pytest.mark.fault(
    "a manifest naming two tensors alike, over shared memory", expect="DATA_LOSS; never a state dict one tensor short"
)
@pytest.mark.parametrize("copy", [False, True])
def test_a_manifest_naming_a_tensor_twice_is_data_loss(
    root: Path, serve_unix: ServeUnix, monkeypatch: pytest.MonkeyPatch, copy: bool
) -> None:
    server = serve_unix(root)
    honest = WeightClient._manifest

    def twice(self: WeightClient, shard: object) -> pb.GetManifestResponse:
        manifest = honest(self, shard)  # type: ignore[arg-type]
        manifest.tensors[1].name = manifest.tensors[0].name
        return manifest

    monkeypatch.setattr(WeightClient, "_manifest", twice)
    with WeightClient(server.address) as client, pytest.raises(FetchError, match="listed twice") as info:
        client.fetch_state_dict(MODEL, transport="shm", copy=copy)
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
