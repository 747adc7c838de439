"""A replica fill is complete or it is nothing: a peer's stream that ends early with status OK is not a copy.

A fake peer, named in a real redis-server's `ready` record, cuts its FillReplica stream
in the ways a buggy, older or hostile peer (or a proxy closing streams cleanly) would.
The filler must publish no copy from it, leave no `.fill` file behind, and fill from the
origin instead; the real server's stream lists every file first.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from weightserve import wire
from weightserve.errors import UnavailableError
from weightserve.server.replica_fill import fill_from_peer
from weightserve.storage.coordination import RedisCoordinator
from weightserve.storage.disk_cache import DiskCache
from weightserve.storage.fleet_fill import FleetFill
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc

KEY = "s3://b/org/m@etag-cut"
FILES = {
    "config.json": b'{"model_type": "llama"}',
    "model-00001-of-00002.safetensors": os.urandom(40_000),
    "model-00002-of-00002.safetensors": os.urandom(50_000),
}
NAMES = sorted(FILES)

pytestmark = pytest.mark.timeout(60)


class CuttingPeer(pb_grpc.ReplicaServiceServicer):
    """Sends the entry's files, but ends the stream OK where `cut` says.

    `cut`: "inside" (half of the last file, no `last`), "between" (the last file never
    sent), "unlisted" (everything, but no file list: a peer that predates it).
    """

    def __init__(self, cut: str) -> None:
        self.cut = cut

    def FillReplica(self, request: pb.FillReplicaRequest, context: grpc.ServicerContext) -> Iterator[pb.FileChunk]:
        listing = pb.FillEntry(files=[pb.FillEntryFile(path=n, size=len(FILES[n])) for n in NAMES])
        for i, name in enumerate(NAMES):
            data = FILES[name]
            if name == NAMES[-1] and self.cut == "between":
                return
            if name == NAMES[-1] and self.cut == "inside":
                half = data[: len(data) // 2]
                yield pb.FileChunk(path=name, size=len(data), crc32c=wire.crc32c(half), data=half)
                return
            crc = wire.crc32c(data)
            chunk = pb.FileChunk(path=name, size=len(data), crc32c=crc, last=True, file_crc32c=crc, data=data)
            if i == 0 and self.cut != "unlisted":
                chunk.entry.CopyFrom(listing)
            yield chunk


def _peer(cut: str) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_ReplicaServiceServicer_to_server(CuttingPeer(cut), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def _origin(calls: list[str]) -> Callable[[Path], None]:
    def fill(directory: Path) -> None:
        calls.append("origin")
        for name, data in FILES.items():
            (directory / name).write_bytes(data)

    return fill


@pytest.mark.fault(
    "replica fill stream that ends early with status OK",
    expect="UNAVAILABLE; the partial copy is discarded and the replica fills from the origin; nothing .fill published",
    cases=3,
)
@pytest.mark.parametrize("cut", ["inside", "between", "unlisted"])
def test_a_cut_fill_is_never_published_and_the_origin_fills_instead(redis_url: str, tmp_path: Path, cut: str) -> None:
    for address in _peer(cut):
        owner = RedisCoordinator(redis_url, address)
        lease = owner.acquire(KEY)
        assert lease is not None and owner.publish(KEY, lease)  # the peer "downloaded" and named its copy

        direct = tmp_path / "direct"
        direct.mkdir()
        with pytest.raises(UnavailableError, match=r"ended|predates"):  # the filler on its own refuses the copy
            fill_from_peer(lease, KEY, direct)

        me = RedisCoordinator(redis_url, "127.0.0.1:1")
        cache = DiskCache(tmp_path / "cache")
        cache.fleet = FleetFill(me, fill_from_peer)
        calls: list[str] = []
        files = cache.populate(KEY, sum(map(len, FILES.values())), _origin(calls))

        assert calls == ["origin"], "the cut copy was published, or the origin was never asked"
        assert {p.name: p.read_bytes() for p in files.iterdir()} == FILES
        assert not list((tmp_path / "cache").rglob("*.fill")) and not list((tmp_path / "cache").glob("*.partial"))
        ready = me.ready(KEY)
        assert ready is not None and ready.address == "127.0.0.1:1", "the cut copy is still named to the fleet"
