"""FillReplica: only published entries, only to the `replica` scope, resumable from (path, offset)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from weightserve import wire
from weightserve.config import ServerConfig
from weightserve.errors import UnavailableError
from weightserve.server.replica_fill import fill_from_peer
from weightserve.server.tokens import token_digest
from weightserve.storage.coordination import Holder
from weightserve.storage.disk_cache import DiskCache
from weightserve.testing import BackgroundServer
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc

KEY = "s3://b/org/m@etag-1234"
REPLICA, WORKER = "replica-secret", "worker-secret"
TOKEN = 7
"""The fleet lease token the published copy carries."""
FILES = {"a.safetensors": os.urandom(3 << 20 | 12345), "config.json": b'{"model_type": "llama"}', "sub/c.txt": b""}

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def replica(tmp_path: Path) -> Iterator[str]:
    """A server with tokens whose S3 disk cache holds KEY, published, and a partial download beside it."""
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        f'[[tokens]]\nname = "replica"\nsha256 = "{token_digest(REPLICA)}"\nmodels = ["**"]\nreplica = true\n\n'
        f'[[tokens]]\nname = "worker"\nsha256 = "{token_digest(WORKER)}"\nmodels = ["**"]\n'
    )

    def fill(directory: Path) -> None:
        for name, data in FILES.items():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            (directory / name).write_bytes(data)

    cache = DiskCache(tmp_path / "cache" / "s3")
    cache.populate_here(KEY, sum(map(len, FILES.values())), fill, token=TOKEN)
    (cache.root / "in-flight.partial" / "files").mkdir(parents=True)  # a download in progress
    (tmp_path / "roots").mkdir()
    config = ServerConfig(
        model_roots=(tmp_path / "roots",), listen="127.0.0.1:0", metrics_listen="off", allow_source=("s3://b/*",),
        disk_cache_dir=tmp_path / "cache", auth_tokens=tokens,
    )  # fmt: skip
    with BackgroundServer(config) as server:
        yield server.address


def _fill(address: str, bearer: str, **request: Any) -> list[pb.FileChunk]:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ReplicaServiceStub(channel)
        call = stub.FillReplica(pb.FillReplicaRequest(**request), metadata=(("authorization", f"Bearer {bearer}"),))
        return list(call)


def test_a_replica_copies_a_published_model_file_for_file(replica: str, tmp_path: Path) -> None:
    dest = tmp_path / "copy"
    dest.mkdir()
    fill_from_peer(Holder(TOKEN, replica), KEY, dest, metadata=(("authorization", f"Bearer {REPLICA}"),))
    got = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert got == FILES


def test_only_the_replica_scope_may_fill(replica: str) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        _fill(replica, WORKER, key=KEY)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_fill_resumes_from_a_path_and_offset_with_the_whole_files_checksum(replica: str) -> None:
    data = FILES["a.safetensors"]
    chunks = _fill(replica, REPLICA, key=KEY, path="a.safetensors", offset=1_000_000)
    first = [c for c in chunks if c.path == "a.safetensors"]
    assert first[0].offset == 1_000_000
    assert b"".join(c.data for c in first) == data[1_000_000:]
    assert first[-1].last and first[-1].file_crc32c == wire.crc32c(data)
    assert [c.path for c in chunks if c.last] == ["a.safetensors", "config.json", "sub/c.txt"]
    after = _fill(replica, REPLICA, key=KEY, path="a.safetensors", offset=len(data))
    assert [c.path for c in after if c.last] == ["config.json", "sub/c.txt"], "offset = size resumes at the next file"


@pytest.mark.parametrize(
    ("request_fields", "code"),
    [
        ({"key": "s3://b/org/m@other"}, grpc.StatusCode.NOT_FOUND),
        ({"key": "in-flight"}, grpc.StatusCode.NOT_FOUND),
        ({"key": KEY, "path": "../../tokens.toml"}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"key": KEY, "path": "config.json", "offset": 10_000}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"key": KEY, "token": TOKEN + 1}, grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
def test_unpublished_entries_and_bad_resume_points_are_refused(
    replica: str, request_fields: dict[str, Any], code: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        _fill(replica, REPLICA, **request_fields)
    assert refused.value.code() == code


def test_a_peer_without_the_copy_is_unavailable_to_the_filler(replica: str, tmp_path: Path) -> None:
    with pytest.raises(UnavailableError, match="not published"):
        fill_from_peer(replica, "s3://b/none@x", tmp_path, metadata=(("authorization", f"Bearer {REPLICA}"),))


def test_every_stream_lists_the_entrys_files_first_so_a_cut_copy_is_noticed(replica: str) -> None:
    listed = {name: len(data) for name, data in FILES.items()}
    for request in ({"key": KEY}, {"key": KEY, "path": "config.json", "offset": 3}):
        chunks = _fill(replica, REPLICA, **request)
        assert {f.path: f.size for f in chunks[0].entry.files} == listed
        assert not any(c.HasField("entry") for c in chunks[1:])
