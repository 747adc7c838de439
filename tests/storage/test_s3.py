"""S3 models against moto's standalone server: file choice, ranged GETs, retries, end to end."""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import torch

from weightserve.client import WeightClient
from weightserve.config import ServerConfig
from weightserve.errors import CorruptCheckpointError, FetchError, ModelNotFoundError, UnavailableError
from weightserve.loaders.formats import model_files
from weightserve.storage import storage_for
from weightserve.storage.base import parse_remote
from weightserve.storage.disk_cache import DiskCache
from weightserve.storage.s3 import S3Storage

TINY = "org/tiny-llama"


def storage(tmp_path: Path, client: Any, **kwargs: Any) -> S3Storage:
    return S3Storage(DiskCache(tmp_path / "cache"), client, **kwargs)


@pytest.fixture
def uploaded(bucket: tuple[Any, str], model_root: Path, tmp_path: Path, s3: SimpleNamespace) -> tuple[Any, str, Path]:
    """The tiny Llama under s3://BUCKET/prefix/model, beside files a server must never fetch."""
    client, name = bucket
    source = tmp_path / "source"
    shutil.copytree(model_root / TINY, source)
    s3.upload_dir(client, name, "prefix/model", source)
    extras = {
        "optimizer.pt": b"optimizer state",
        "training_args.bin": b"args",
        "unlisted.safetensors": b"not named by the index",
        "README.md": b"# card",
        "original/consolidated.00.pth": b"another format",
    }
    for key, data in extras.items():
        client.put_object(Bucket=name, Key=f"prefix/model/{key}", Body=data)
    return client, name, source


def test_downloads_only_the_indexed_weights_and_configs(
    uploaded: tuple[Any, str, Path], tmp_path: Path, s3: SimpleNamespace
) -> None:
    client, name, source = uploaded
    counting = s3.counting(client)
    location = storage(tmp_path, counting).resolve(parse_remote(f"s3://{name}/prefix/model"))

    served = sorted(p.name for p in location.model_dir.iterdir())
    assert served == sorted(p.name for p in source.iterdir())
    for path in source.iterdir():
        assert (location.model_dir / path.name).read_bytes() == path.read_bytes()
    fetched = {key.rsplit("/", 1)[1] for key, _ in counting.gets}
    assert fetched == set(served)
    assert location.source == "s3" and location.revision is not None and location.revision.startswith("s3-")
    assert model_files(location.model_dir, "", location.revision).revision == location.revision


def test_ranges_are_fetched_in_parallel_parts(
    uploaded: tuple[Any, str, Path], tmp_path: Path, s3: SimpleNamespace
) -> None:
    client, name, source = uploaded
    counting = s3.counting(client)
    location = storage(tmp_path, counting, part_bytes=16 * 1024, threads=4).resolve(
        parse_remote(f"s3://{name}/prefix/model")
    )
    shard = "model-00001-of-00002.safetensors"
    size = (source / shard).stat().st_size
    ranges = sorted((int(r[6:].split("-")[0]), r) for key, r in counting.gets if key.endswith(shard))
    assert len(ranges) == -(-size // (16 * 1024)) > 2
    assert ranges[0][1] == "bytes=0-16383"
    assert (location.model_dir / shard).read_bytes() == (source / shard).read_bytes()


def test_second_resolve_reuses_the_disk_cache(
    uploaded: tuple[Any, str, Path], tmp_path: Path, s3: SimpleNamespace
) -> None:
    client, name, _ = uploaded
    first = storage(tmp_path, client).resolve(parse_remote(f"s3://{name}/prefix/model"))
    counting = s3.counting(client)
    again = storage(tmp_path, counting).resolve(parse_remote(f"s3://{name}/prefix/model"))  # a new server
    assert again == first
    assert [key for key, _ in counting.gets] == ["prefix/model/model.safetensors.index.json"]


@pytest.mark.fault(
    "a cached S3 model truncated on disk", expect="a new server downloads it again; the fetch is bit-identical"
)
def test_a_truncated_cached_file_is_downloaded_again(
    uploaded: tuple[Any, str, Path], tmp_path: Path, s3: SimpleNamespace
) -> None:
    client, name, source = uploaded
    first = storage(tmp_path, client).resolve(parse_remote(f"s3://{name}/prefix/model"))
    weights = sorted(first.model_dir.glob("*.safetensors"))[0]
    size = weights.stat().st_size
    with weights.open("r+b") as f:
        f.truncate(size // 2)  # a disk that lost the end of a file
    counting = s3.counting(client)
    again = storage(tmp_path, counting).resolve(parse_remote(f"s3://{name}/prefix/model"))  # a new server
    assert again.revision == first.revision
    assert (again.model_dir / weights.name).read_bytes() == (source / weights.name).read_bytes()
    assert f"prefix/model/{weights.name}" in {key for key, _ in counting.gets}


@pytest.mark.fault("S3 object replaced")
def test_a_replaced_object_is_a_new_revision(uploaded: tuple[Any, str, Path], tmp_path: Path) -> None:
    client, name, _ = uploaded
    remote = f"s3://{name}/prefix/model"
    first = storage(tmp_path, client).resolve(parse_remote(remote))
    client.put_object(
        Bucket=name,
        Key="prefix/model/config.json",
        Body=first.model_dir.joinpath("config.json").read_bytes().replace(b"llama", b"llama "),
    )
    second = storage(tmp_path, client).resolve(parse_remote(remote))
    assert second.revision != first.revision and second.model_dir != first.model_dir
    assert storage(tmp_path, client).resolve(parse_remote(f"{remote}@{second.revision}")).model_dir == second.model_dir
    # the old revision is still on disk, so a name pinned to it is served from there ...
    assert storage(tmp_path, client).resolve(parse_remote(f"{remote}@{first.revision}")).model_dir == first.model_dir
    # ... and a server without it cannot fetch it again
    with pytest.raises(ModelNotFoundError, match="only the current objects"):
        storage(tmp_path / "elsewhere", client).resolve(parse_remote(f"{remote}@{first.revision}"))


@pytest.mark.fault("remote download dropped or failing")
def test_a_dropped_connection_is_retried(
    uploaded: tuple[Any, str, Path],
    tmp_path: Path,
    s3: SimpleNamespace,
    cutting_proxy: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, name, source = uploaded
    proxy = cutting_proxy(24 * 1024)
    client = s3.client(proxy.endpoint, attempts=1)  # botocore gives up at once: our retry must do it
    with caplog.at_level(logging.WARNING, logger="weightserve.storage.ranged"):
        location = storage(tmp_path, client, part_bytes=64 * 1024, threads=2).resolve(
            parse_remote(f"s3://{name}/prefix/model")
        )
    assert proxy.cuts == 1 and proxy.connections > 1
    assert any("retrying" in r.message for r in caplog.records)
    for path in source.iterdir():
        assert (location.model_dir / path.name).read_bytes() == path.read_bytes()


def test_without_index_every_safetensors_file_is_served(bucket: tuple[Any, str], tmp_path: Path) -> None:
    client, name = bucket
    for key, data in {
        "a.safetensors": b"A" * 10,
        "b.safetensors": b"B",
        "config.json": b"{}",
        "optimizer.pt": b"no",
        "sub/c.safetensors": b"no",
    }.items():
        client.put_object(Bucket=name, Key=f"m/{key}", Body=data)
    location = storage(tmp_path, client).resolve(parse_remote(f"s3://{name}/m"))
    assert sorted(p.name for p in location.model_dir.iterdir()) == [
        "a.safetensors",
        "b.safetensors",
        "config.json",
    ]


@pytest.mark.fault("missing bucket or prefix, broken index, unreachable store", cases=5)
def test_errors_name_the_problem(bucket: tuple[Any, str], tmp_path: Path, s3: SimpleNamespace) -> None:
    client, name = bucket
    backend = storage(tmp_path, client)
    with pytest.raises(ModelNotFoundError, match="NoSuchBucket"):
        backend.resolve(parse_remote(f"s3://{name}-missing/m"))
    with pytest.raises(ModelNotFoundError, match="no objects"):
        backend.resolve(parse_remote(f"s3://{name}/nothing-here"))
    with pytest.raises(ModelNotFoundError, match="s3://BUCKET/PREFIX"):
        backend.resolve(parse_remote(f"s3://{name}"))
    client.put_object(
        Bucket=name,
        Key="broken/model.safetensors.index.json",
        Body=b'{"weight_map": {"w": "gone.safetensors"}}',
    )
    with pytest.raises(CorruptCheckpointError, match=r"gone\.safetensors"):
        backend.resolve(parse_remote(f"s3://{name}/broken"))
    unreachable = storage(tmp_path, s3.client("http://127.0.0.1:9", attempts=1))
    with pytest.raises(UnavailableError, match="could not be reached"):
        unreachable.resolve(parse_remote(f"s3://{name}/m"))


@pytest.mark.fault("remote source outside the allow-list")
def test_server_serves_s3_models_and_denies_other_buckets(
    uploaded: tuple[Any, str, Path], model_root: Path, tmp_path: Path, serve: Any
) -> None:
    _, name, _ = uploaded
    server = serve(model_root, allow_source=(f"s3://{name}/prefix/*",), disk_cache_dir=tmp_path / "disk")
    with WeightClient(server.address) as client:
        local = client.fetch_state_dict(TINY)
        remote = client.fetch_state_dict(f"s3://{name}/prefix/model")
        assert remote.keys() == local.keys()
        for key, tensor in local.items():
            assert torch.equal(remote[key].view(torch.uint8), tensor.view(torch.uint8)), key
        rank1 = client.fetch_state_dict(f"s3://{name}/prefix/model", rank=1, world_size=2)
        assert torch.equal(
            rank1["model.layers.0.mlp.down_proj.weight"],
            client.fetch_state_dict(TINY, rank=1, world_size=2)["model.layers.0.mlp.down_proj.weight"],
        )
        for denied in (f"s3://other-{name}/prefix/model", f"s3://{name}/elsewhere/model"):
            with pytest.raises(FetchError) as caught:
                client.fetch_state_dict(denied)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, denied
    assert list((tmp_path / "disk" / "s3").glob("*/entry.json"))


def test_storage_for_builds_the_s3_backend_from_config(aws_env: str, tmp_path: Path) -> None:
    backend = storage_for("s3", ServerConfig(disk_cache_dir=tmp_path, disk_cache_bytes=10**9))
    assert isinstance(backend, S3Storage)
    assert backend.cache.root == tmp_path / "s3" and backend.cache.budget_bytes == 10**9


@pytest.mark.fault("remote download dropped or failing")
def test_one_retry_layer_a_failing_request_is_tried_attempts_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """botocore's retries are off (make_client), so a request that keeps failing costs ATTEMPTS, not 5 x 5."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from weightserve.storage.s3 import ATTEMPTS, make_client

    requests: list[str] = []

    class Unavailable(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            requests.append(self.path)
            body = b"<Error><Code>ServiceUnavailable</Code><Message>try later</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        backend = storage(tmp_path, make_client(), backoff=0.001)
        with pytest.raises(UnavailableError, match="ServiceUnavailable"):
            backend.resolve(parse_remote("s3://bucket/prefix/model"))
    finally:
        server.shutdown()
        server.server_close()
    assert len(requests) == ATTEMPTS == 5
