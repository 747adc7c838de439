"""WeightService over a real server on loopback, called with the stock generated stubs.

Nothing here uses weightserve's client: every message is parsed by protobuf itself,
so these tests pin the wire contract any gRPC language sees.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from safetensors.torch import load_file, save_file

from weightserve import wire
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc

MODEL = "org/tiny-llama"
STOCK_MAX_MESSAGE = 4 * 1024 * 1024
"""grpc's default receive limit: every message must fit a client with default options."""


# ------------------------------------------------------------------------ fixtures
# (kept here rather than in a tests/server/conftest.py: a second module named
# `conftest` would shadow tests/conftest.py for tests that import from it)


@pytest.fixture
def channels() -> Iterator[Callable[[str], grpc.Channel]]:
    """`channels(address)` opens a plain insecure channel with default options."""
    opened: list[grpc.Channel] = []

    def open_channel(address: str) -> grpc.Channel:
        channel = grpc.insecure_channel(address)
        opened.append(channel)
        return channel

    yield open_channel
    for channel in opened:
        channel.close()


@pytest.fixture
def stub(channels: Callable[[str], grpc.Channel]) -> Callable[[str], pb_grpc.WeightServiceStub]:
    """`stub(address)` is a stock WeightServiceStub over a default channel."""
    return lambda address: pb_grpc.WeightServiceStub(channels(address))


# ------------------------------------------------------------------------- helpers


def raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def reference(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def spec(model: str = MODEL, **kw: object) -> pb.ShardSpec:
    return pb.ShardSpec(model=model, **kw)  # type: ignore[arg-type]


def manifest_of(stub: pb_grpc.WeightServiceStub, model: str = MODEL, **kw: object) -> pb.GetManifestResponse:
    return stub.GetManifest(pb.GetManifestRequest(shard=spec(model, **kw)))


def fetch(stub: pb_grpc.WeightServiceStub, model: str = MODEL, **kw: object) -> list[pb.TensorChunk]:
    shard_kw = {k: kw.pop(k) for k in list(kw) if k in pb.ShardSpec.DESCRIPTOR.fields_by_name}
    return list(stub.FetchShard(pb.FetchShardRequest(shard=spec(model, **shard_kw), **kw)))  # type: ignore[arg-type]


def fetch_raw(channel: grpc.Channel, request: pb.FetchShardRequest) -> list[bytes]:
    """The stream's messages as the bytes on the wire (no deserializer)."""
    call = channel.unary_stream(
        "/weightserve.v1.WeightService/FetchShard", request_serializer=pb.FetchShardRequest.SerializeToString
    )
    return list(call(request))


def rpc_error(call: Callable[[], object], code: grpc.StatusCode, pattern: str = "") -> str:
    """Run `call`, expect it to fail with `code` and a message matching `pattern`; return the message."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    error = info.value
    assert error.code() == code, error.details()
    assert re.search(pattern, error.details()), error.details()
    return error.details()


def assemble(chunks: list[pb.TensorChunk], manifest: pb.GetManifestResponse) -> dict[str, bytes]:
    """Check every chunk invariant of the contract and return each tensor's bytes, in stream order."""
    data: dict[int, bytearray] = {}
    current: int | None = None  # the tensor whose chunks are arriving
    running = 0
    for chunk in chunks:
        index = chunk.tensor_index
        info = manifest.tensors[index]
        assert len(chunk.data) <= manifest.max_chunk_bytes
        assert chunk.ByteSize() < STOCK_MAX_MESSAGE
        assert wire.crc32c(chunk.data) == chunk.crc32c
        if current is None:  # the first chunk of a tensor carries its header
            assert index not in data, f"{info.name} sent twice"
            assert chunk.HasField("header"), info.name
            assert chunk.header == pb.TensorHeader(
                name=info.name, dtype=info.dtype, shape=info.shape, nbytes=info.nbytes
            )
            current, running = index, 0
            data[index] = bytearray()
        else:
            assert index == current, "chunks of two tensors interleave"
            assert not chunk.HasField("header")
        assert chunk.offset == len(data[index]), "offsets are not contiguous"
        data[index] += chunk.data
        running = wire.crc32c_combine(running, chunk.crc32c, len(chunk.data))
        if chunk.last:
            assert len(data[index]) == info.nbytes
            assert chunk.tensor_crc32c == wire.crc32c(bytes(data[index])) == running
            current = None
        else:
            assert len(data[index]) < info.nbytes
            assert chunk.tensor_crc32c == 0
    assert current is None, "stream ended inside a tensor"
    assert list(data) == sorted(data), "tensors out of manifest order"
    return {manifest.tensors[i].name: bytes(data[i]) for i in data}


def copy_model(model_root: Path, dest_root: Path, name: str = MODEL) -> Path:
    """A private copy of the tiny llama that a test may change (mtimes kept)."""
    dest = dest_root / name
    shutil.copytree(model_root / MODEL, dest)
    return dest


def write_bin_model(model_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, model_dir / "pytorch_model.bin")


class Evil:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------------- ListModels


def test_list_models(model_root: Path, serve, stub) -> None:
    server = serve(model_root)
    response = stub(server.address).ListModels(pb.ListModelsRequest())
    (info,) = response.models
    assert info.name == MODEL
    assert info.format == "safetensors"
    assert list(info.formats) == ["safetensors"]
    model_dir = model_root / MODEL
    assert info.total_bytes == sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    assert info.revision == manifest_of(stub(server.address)).revision


def test_list_models_over_several_roots_and_formats(model_root: Path, tmp_path: Path, serve, stub) -> None:
    other = tmp_path / "other"
    write_bin_model(other / "team" / "bin-only", {"w": torch.arange(6.0)})
    copy_model(model_root, other)  # shadowed by the first root
    (other / "team" / "empty").mkdir(parents=True)
    server = serve(model_root, other)
    models = {m.name: m for m in stub(server.address).ListModels(pb.ListModelsRequest()).models}
    assert list(models) == [MODEL, "team/bin-only"]
    assert models["team/bin-only"].format == "torch"
    assert list(models["team/bin-only"].formats) == ["torch"]


# --------------------------------------------------------------------- GetManifest


def test_get_manifest_fields(model_root: Path, serve, stub) -> None:
    server = serve(model_root, chunk_bytes=4096)
    manifest = manifest_of(stub(server.address))
    ref = reference(model_root / MODEL)

    assert manifest.format == "safetensors"
    assert manifest.wire_version == wire.WIRE_VERSION
    assert manifest.max_chunk_bytes == 4096
    assert manifest.revision.startswith("local-")
    assert re.fullmatch(r"[0-9a-f]{32}", manifest.manifest_id)
    assert {t.name for t in manifest.tensors} == set(ref)
    for info in manifest.tensors:
        tensor = ref[info.name]
        assert info.dtype == wire.dtype_name(tensor.dtype)
        assert list(info.shape) == list(tensor.shape)
        assert info.nbytes == tensor.numel() * tensor.element_size()
    assert manifest.total_bytes == sum(t.nbytes for t in manifest.tensors)


def test_manifest_is_identical_across_servers(model_root: Path, serve, stub) -> None:
    # Two servers over the same files are replicas (or one server restarted).
    first = manifest_of(stub(serve(model_root).address))
    second = manifest_of(stub(serve(model_root).address))
    assert first.revision == second.revision
    assert first.manifest_id == second.manifest_id
    assert [t.name for t in first.tensors] == [t.name for t in second.tensors]


def test_manifest_id_depends_on_the_plan(model_root: Path, tmp_path: Path, serve, stub) -> None:
    model_dir = copy_model(model_root, tmp_path)
    torch.save(reference(model_dir), model_dir / "pytorch_model.bin")
    s = stub(serve(tmp_path).address)
    default, as_torch = manifest_of(s), manifest_of(s, format="torch")
    assert default.format == "safetensors" and as_torch.format == "torch"
    assert default.manifest_id != as_torch.manifest_id


def test_manifest_reports_digests_once_a_stream_computed_them(model_root: Path, serve, stub) -> None:
    s = stub(serve(model_root).address)
    before = manifest_of(s)
    assert not any(t.HasField("crc32c") for t in before.tensors)
    fetch(s, manifest_id=before.manifest_id)
    after = manifest_of(s)
    ref = reference(model_root / MODEL)
    for info in after.tensors:
        assert info.HasField("crc32c")
        assert info.crc32c == wire.crc32c(raw(ref[info.name]))


# ---------------------------------------------------------------------- FetchShard


def test_fetch_shard_stream_with_stock_stubs(model_root: Path, serve, stub) -> None:
    server = serve(model_root, chunk_bytes=4096)
    s = stub(server.address)
    manifest = manifest_of(s)
    chunks = fetch(s, manifest_id=manifest.manifest_id)

    tensors = assemble(chunks, manifest)

    assert list(tensors) == [t.name for t in manifest.tensors]
    ref = reference(model_root / MODEL)
    assert all(tensors[name] == raw(ref[name]) for name in ref)
    per_tensor = {t.name: -(-t.nbytes // 4096) for t in manifest.tensors}
    assert max(per_tensor.values()) > 3  # the small chunk size really split tensors
    assert len(chunks) == sum(max(n, 1) for n in per_tensor.values())
    assert max(len(c.data) for c in chunks) == 4096


def test_fetch_shard_without_manifest_id(model_root: Path, serve, stub) -> None:
    s = stub(serve(model_root).address)
    manifest = manifest_of(s)
    tensors = assemble(fetch(s), manifest)
    assert len(tensors) == len(manifest.tensors)


def test_default_chunks_fit_a_default_grpc_client(tmp_path: Path, serve, channels) -> None:
    # 9 MiB in one tensor, served with the default chunk size, to a channel with
    # grpc's default 4 MiB receive limit; a long name makes the header as large as allowed.
    name = "x" * 4000
    big = torch.arange(9 * 1024 * 1024 // 4, dtype=torch.float32).reshape(-1, 1024)
    (tmp_path / "org" / "big").mkdir(parents=True)
    save_file({name: big, "small": torch.arange(3.0)}, str(tmp_path / "org" / "big" / "model.safetensors"))
    server = serve(tmp_path)
    channel = channels(server.address)
    s = pb_grpc.WeightServiceStub(channel)
    manifest = manifest_of(s, "org/big")

    messages = fetch_raw(channel, pb.FetchShardRequest(shard=spec("org/big"), manifest_id=manifest.manifest_id))

    assert all(len(m) < STOCK_MAX_MESSAGE for m in messages)
    chunks = [pb.TensorChunk.FromString(m) for m in messages]
    tensors = assemble(chunks, manifest)
    assert tensors[name] == raw(big)
    assert sum(1 for c in chunks if c.tensor_index == [t.name for t in manifest.tensors].index(name)) == 3


def test_names_filter_returns_only_those_in_manifest_order(model_root: Path, serve, stub) -> None:
    s = stub(serve(model_root, chunk_bytes=4096).address)
    manifest = manifest_of(s)
    all_names = [t.name for t in manifest.tensors]
    wanted = [all_names[-1], all_names[0], all_names[len(all_names) // 2]]  # not in manifest order

    tensors = assemble(fetch(s, names=wanted, manifest_id=manifest.manifest_id), manifest)

    assert list(tensors) == [n for n in all_names if n in wanted]
    ref = reference(model_root / MODEL)
    assert all(tensors[n] == raw(ref[n]) for n in wanted)


@pytest.mark.fault("unknown tensor or format")
def test_unknown_tensor_name_is_not_found(model_root: Path, serve, stub) -> None:
    s = stub(serve(model_root).address)
    rpc_error(
        lambda: fetch(s, names=["model.norm.weight", "no.such.tensor"]),
        grpc.StatusCode.NOT_FOUND,
        "no.such.tensor",
    )


@pytest.mark.fault("model name or symlink escaping the roots")
@pytest.mark.parametrize(
    "name", ["org/nope", "../models", "org/../../etc", "/etc", "/etc/passwd", "org\\tiny-llama", ""]
)
def test_unknown_or_escaping_models_are_not_found(model_root: Path, serve, stub, name: str) -> None:
    s = stub(serve(model_root).address)
    code = grpc.StatusCode.INVALID_ARGUMENT if name == "" else grpc.StatusCode.NOT_FOUND
    rpc_error(lambda: manifest_of(s, name), code)
    rpc_error(lambda: fetch(s, name), code)
    if name:
        rpc_error(lambda: list(s.FetchFiles(pb.FetchFilesRequest(model=name))), grpc.StatusCode.NOT_FOUND)


@pytest.mark.fault("model name or symlink escaping the roots")
def test_symlink_out_of_the_root_is_not_found(model_root: Path, tmp_path: Path, serve, stub) -> None:
    root = tmp_path / "root"
    (root / "org").mkdir(parents=True)
    (root / "org" / "link").symlink_to(model_root / MODEL, target_is_directory=True)
    s = stub(serve(root).address)
    assert list(s.ListModels(pb.ListModelsRequest()).models) == []
    details = rpc_error(lambda: manifest_of(s, "org/link"), grpc.StatusCode.NOT_FOUND, "org/link")
    assert str(model_root) not in details  # no probing of the server's file system
    rpc_error(lambda: fetch(s, "org/link"), grpc.StatusCode.NOT_FOUND)
    rpc_error(lambda: list(s.FetchFiles(pb.FetchFilesRequest(model="org/link"))), grpc.StatusCode.NOT_FOUND)


@pytest.mark.fault("impossible rank or world size")
@pytest.mark.parametrize(
    ("rank", "world_size", "pattern"),
    [
        (1, 1, r"rank 1\b.*world_size 1\b"),
        (4, 2, r"rank 4\b.*world_size 2\b"),
        (-1, 1, r"rank -1\b"),
        (0, -1, r"world_size -1\b"),
    ],
)
def test_bad_ranks_are_invalid_argument(
    model_root: Path, serve, stub, *, rank: int, world_size: int, pattern: str
) -> None:
    s = stub(serve(model_root).address)
    rpc_error(lambda: manifest_of(s, rank=rank, world_size=world_size), grpc.StatusCode.INVALID_ARGUMENT, pattern)
    rpc_error(lambda: fetch(s, rank=rank, world_size=world_size), grpc.StatusCode.INVALID_ARGUMENT, pattern)


@pytest.mark.fault("unknown tensor or format")
def test_torch_format_on_a_safetensors_only_model_is_not_found(model_root: Path, serve, stub) -> None:
    s = stub(serve(model_root).address)
    rpc_error(lambda: manifest_of(s, format="torch"), grpc.StatusCode.NOT_FOUND, r"no torch weights")
    rpc_error(lambda: fetch(s, format="torch"), grpc.StatusCode.NOT_FOUND)


@pytest.mark.fault("unknown tensor or format")
def test_unknown_format_is_invalid_argument(model_root: Path, serve, stub) -> None:
    s = stub(serve(model_root).address)
    rpc_error(lambda: manifest_of(s, format="onnx"), grpc.StatusCode.INVALID_ARGUMENT, r"no loader 'onnx'")


def test_safetensors_is_served_by_default_and_bin_on_request(tmp_path: Path, serve, stub) -> None:
    model_dir = tmp_path / "org" / "both"
    model_dir.mkdir(parents=True)
    st_tensors = {
        "w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.arange(3, dtype=torch.int64),
    }
    bin_tensors = {
        "w": torch.arange(12, dtype=torch.float16).reshape(3, 4),
        "other": torch.arange(5, dtype=torch.int8),
    }
    save_file(st_tensors, str(model_dir / "model.safetensors"))
    torch.save(bin_tensors, model_dir / "pytorch_model.bin")
    s = stub(serve(tmp_path, chunk_bytes=4096).address)

    (info,) = s.ListModels(pb.ListModelsRequest()).models
    assert (info.format, list(info.formats)) == ("safetensors", ["safetensors", "torch"])

    default = manifest_of(s, "org/both")
    assert default.format == "safetensors"
    got = assemble(fetch(s, "org/both", manifest_id=default.manifest_id), default)
    assert got == {name: raw(t) for name, t in st_tensors.items()}

    as_torch = manifest_of(s, "org/both", format="torch")
    assert as_torch.format == "torch"
    got = assemble(fetch(s, "org/both", format="torch", manifest_id=as_torch.manifest_id), as_torch)
    assert got == {name: raw(t) for name, t in bin_tensors.items()}


@pytest.mark.fault("stale revision or manifest id")
def test_pinned_wrong_revision_is_failed_precondition(model_root: Path, serve, stub) -> None:
    s = stub(serve(model_root).address)
    current = manifest_of(s).revision
    rpc_error(lambda: manifest_of(s, revision="local-0000"), grpc.StatusCode.FAILED_PRECONDITION, re.escape(current))
    rpc_error(lambda: fetch(s, revision="local-0000"), grpc.StatusCode.FAILED_PRECONDITION, "local-0000")
    assert manifest_of(s, revision=current).revision == current  # the right pin works


@pytest.mark.fault("stale revision or manifest id")
def test_stale_manifest_id_is_failed_precondition(model_root: Path, tmp_path: Path, serve, stub) -> None:
    model_dir = copy_model(model_root, tmp_path)
    s = stub(serve(tmp_path).address)
    old = manifest_of(s)
    rpc_error(
        lambda: fetch(s, manifest_id="0" * 32),
        grpc.StatusCode.FAILED_PRECONDITION,
        "fetch the manifest again",
    )

    config = model_dir / "config.json"  # a change to config.json changes the revision
    st = config.stat()
    os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))

    rpc_error(lambda: fetch(s, manifest_id=old.manifest_id), grpc.StatusCode.FAILED_PRECONDITION, old.manifest_id)
    new = manifest_of(s)
    assert new.revision != old.revision and new.manifest_id != old.manifest_id
    assemble(fetch(s, manifest_id=new.manifest_id), new)


@pytest.mark.parametrize("digest_known", [False, True], ids=["fresh-server", "digest-known"])
def test_resume_sends_only_the_rest(model_root: Path, serve, stub, digest_known: bool) -> None:
    s = stub(serve(model_root, chunk_bytes=4096).address)
    manifest = manifest_of(s)
    if digest_known:
        fetch(s, manifest_id=manifest.manifest_id)
    ref = reference(model_root / MODEL)
    names = [t.name for t in manifest.tensors]
    embed = "model.embed_tokens.weight"
    index = names.index(embed)
    whole = raw(ref[embed])
    offset = 5000  # not on a chunk boundary
    request = pb.FetchShardRequest(
        shard=spec(),
        manifest_id=manifest.manifest_id,
        resume_from=pb.ResumePoint(tensor=embed, offset=offset),
    )

    chunks = list(s.FetchShard(request))

    first = [c for c in chunks if c.tensor_index == index]
    assert first[0].offset == offset and first[0].HasField("header")
    assert all(0 < len(c.data) <= 4096 for c in first)
    assert [c.offset for c in first] == [offset + sum(len(c.data) for c in first[:i]) for i in range(len(first))]
    assert b"".join(c.data for c in first) == whole[offset:]
    assert all(wire.crc32c(c.data) == c.crc32c for c in chunks)
    assert first[-1].last and first[-1].tensor_crc32c == wire.crc32c(whole)
    later = [c for c in chunks if c.tensor_index != index]
    assert sorted({c.tensor_index for c in later}) == list(range(index + 1, len(names)))
    assert (
        sum(len(c.data) for c in chunks)
        == manifest.total_bytes - sum(t.nbytes for t in manifest.tensors[:index]) - offset
    )


def test_resume_at_the_end_of_a_tensor_sends_one_empty_last_chunk(model_root: Path, serve, stub) -> None:
    s = stub(serve(model_root).address)
    manifest = manifest_of(s)
    info = manifest.tensors[0]
    whole = raw(reference(model_root / MODEL)[info.name])
    request = pb.FetchShardRequest(
        shard=spec(),
        names=[info.name],
        manifest_id=manifest.manifest_id,
        resume_from=pb.ResumePoint(tensor=info.name, offset=info.nbytes),
    )
    (chunk,) = list(s.FetchShard(request))
    assert (chunk.offset, chunk.data, chunk.last) == (info.nbytes, b"", True)
    assert chunk.tensor_crc32c == wire.crc32c(whole)


@pytest.mark.fault("bad resume point", cases=4)
def test_resume_errors(model_root: Path, serve, stub) -> None:
    s = stub(serve(model_root).address)
    manifest = manifest_of(s)
    info = manifest.tensors[0]

    def resume(
        tensor: str, offset: int, manifest_id: str = manifest.manifest_id, names: tuple[str, ...] = ()
    ) -> list[pb.TensorChunk]:
        point = pb.ResumePoint(tensor=tensor, offset=offset)
        return list(
            s.FetchShard(pb.FetchShardRequest(shard=spec(), names=names, manifest_id=manifest_id, resume_from=point))
        )

    rpc_error(lambda: resume(info.name, 0, manifest_id=""), grpc.StatusCode.INVALID_ARGUMENT, "manifest_id")
    rpc_error(
        lambda: resume(info.name, info.nbytes + 1),
        grpc.StatusCode.INVALID_ARGUMENT,
        rf"offset {info.nbytes + 1}",
    )
    rpc_error(lambda: resume("no.such.tensor", 0), grpc.StatusCode.NOT_FOUND, "no.such.tensor")
    other = manifest.tensors[1].name
    rpc_error(lambda: resume(info.name, 0, names=(other,)), grpc.StatusCode.NOT_FOUND, re.escape(info.name))


# ---------------------------------------------------------------------- FetchFiles


def collect_files(chunks: list[pb.FileChunk]) -> dict[str, bytes]:
    files: dict[str, bytearray] = {}
    for chunk in chunks:
        assert wire.crc32c(chunk.data) == chunk.crc32c
        data = files.setdefault(chunk.path, bytearray())
        assert chunk.offset == len(data)
        data += chunk.data
        if chunk.last:
            assert len(data) == chunk.size
            assert chunk.file_crc32c == wire.crc32c(bytes(data))
    return {path: bytes(data) for path, data in files.items()}


def test_fetch_files_returns_configs_only(model_root: Path, tmp_path: Path, serve, stub) -> None:
    model_dir = copy_model(model_root, tmp_path)
    (model_dir / "tokenizer.json").write_bytes(bytes(range(256)) * 40)  # 10 KiB: several chunks
    torch.save({"w": torch.zeros(2)}, model_dir / "pytorch_model.bin")
    s = stub(serve(tmp_path, chunk_bytes=4096).address)

    chunks = list(s.FetchFiles(pb.FetchFilesRequest(model=MODEL)))
    files = collect_files(chunks)

    assert set(files) == {"config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json"}
    for path, data in files.items():
        assert data == (model_dir / path).read_bytes()
    assert sum(1 for c in chunks if c.path == "tokenizer.json") == 3


def test_fetch_files_never_sends_weights(model_root: Path, serve, stub) -> None:
    s = stub(serve(model_root).address)
    request = pb.FetchFilesRequest(model=MODEL, patterns=["*", "*.safetensors", "*.index.json"])
    paths = {c.path for c in s.FetchFiles(request)}
    assert paths == {"config.json", "generation_config.json", "tokenizer_config.json"}


def test_fetch_files_with_a_pinned_revision(model_root: Path, serve, stub) -> None:
    s = stub(serve(model_root).address)
    revision = manifest_of(s).revision
    assert {c.path for c in s.FetchFiles(pb.FetchFilesRequest(model=MODEL, revision=revision))}
    rpc_error(
        lambda: list(s.FetchFiles(pb.FetchFilesRequest(model=MODEL, revision="local-0"))),
        grpc.StatusCode.FAILED_PRECONDITION,
        "local-0",
    )


# ------------------------------------------------------------- Prefetch and Evict


def test_prefetch_returns_revision_and_bytes(model_root: Path, serve, stub) -> None:
    s = stub(serve(model_root).address)
    manifest = manifest_of(s)
    response = s.Prefetch(pb.PrefetchRequest(model=MODEL))
    assert response.revision == manifest.revision
    assert response.bytes == manifest.total_bytes
    rpc_error(lambda: s.Prefetch(pb.PrefetchRequest(model="org/nope")), grpc.StatusCode.NOT_FOUND)


def test_evict(model_root: Path, serve, stub) -> None:
    s = stub(serve(model_root).address)
    assert s.Evict(pb.EvictRequest(model=MODEL)).evicted is False  # nothing open yet
    manifest = manifest_of(s)
    assert s.Evict(pb.EvictRequest(model=MODEL)).evicted is True
    assert s.Evict(pb.EvictRequest(model=MODEL)).evicted is False
    assemble(fetch(s, manifest_id=manifest.manifest_id), manifest)  # reopened on demand


def test_evict_of_an_unknown_model_is_not_found(model_root: Path, serve, stub) -> None:
    s = stub(serve(model_root).address)
    rpc_error(lambda: s.Evict(pb.EvictRequest(model="org/tiny-lama")), grpc.StatusCode.NOT_FOUND, "org/tiny-lama")
    assert s.Evict(pb.EvictRequest(model=MODEL)).evicted is False  # known but cold: still no error


def test_rebalance_with_an_unknown_policy_is_invalid_argument_at_once(model_root: Path, serve, channels) -> None:
    control = pb_grpc.ControlServiceStub(channels(serve(model_root).address))
    request = pb.RebalanceRequest(model=MODEL, policy="no-such-policy")
    details = rpc_error(lambda: control.Rebalance(request), grpc.StatusCode.INVALID_ARGUMENT, "no-such-policy")
    assert "hierarchical" in details  # the message lists the policies there are


# ------------------------------------------------------------ health, reflection


def test_health_check_is_serving(model_root: Path, serve, channels) -> None:
    health = health_pb2_grpc.HealthStub(channels(serve(model_root).address))
    for service in ("", "weightserve.v1.WeightService"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(model_root: Path, serve, channels) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(channels(serve(model_root).address))
    responses = list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in responses[0].list_services_response.service}
    assert "weightserve.v1.WeightService" in names
    assert "grpc.health.v1.Health" in names
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="weightserve.v1.WeightService")
    (answer,) = list(reflection.ServerReflectionInfo(iter([request])))
    assert answer.file_descriptor_response.file_descriptor_proto


# ------------------------------------------------------- bad models, others serve


@pytest.mark.fault("malicious pickle checkpoint")
def test_malicious_pickle_is_refused_and_others_keep_serving(model_root: Path, tmp_path: Path, serve, stub) -> None:
    root = tmp_path / "root"
    copy_model(model_root, root)
    marker = tmp_path / "PWNED"
    evil_dir = root / "org" / "evil"
    evil_dir.mkdir(parents=True)
    torch.save({"w": torch.zeros(2), "payload": Evil(marker)}, evil_dir / "pytorch_model.bin")
    s = stub(serve(root).address)

    rpc_error(lambda: manifest_of(s, "org/evil"), grpc.StatusCode.FAILED_PRECONDITION, "refusing to unpickle")
    rpc_error(lambda: fetch(s, "org/evil"), grpc.StatusCode.FAILED_PRECONDITION, "refusing to unpickle")
    assert not marker.exists()

    manifest = manifest_of(s)
    assemble(fetch(s, manifest_id=manifest.manifest_id), manifest)
    assert {m.name for m in s.ListModels(pb.ListModelsRequest()).models} == {MODEL, "org/evil"}


@pytest.mark.fault("hostile safetensors header")
def test_corrupt_safetensors_header_is_data_loss_and_others_keep_serving(
    model_root: Path, tmp_path: Path, serve, stub
) -> None:
    root = tmp_path / "root"
    copy_model(model_root, root)
    broken = root / "org" / "broken"
    broken.mkdir(parents=True)
    header = b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 999]}}'
    (broken / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    s = stub(serve(root).address)

    rpc_error(lambda: manifest_of(s, "org/broken"), grpc.StatusCode.DATA_LOSS, r"tensor 'w'.*past the data section")
    rpc_error(lambda: fetch(s, "org/broken"), grpc.StatusCode.DATA_LOSS)

    manifest = manifest_of(s)
    assemble(fetch(s, manifest_id=manifest.manifest_id), manifest)


@pytest.mark.fault("checkpoint file rewritten in place while served")
def test_bytes_changed_under_a_restored_mtime_are_a_new_revision(model_root: Path, tmp_path: Path, serve, stub) -> None:
    # Same size, same mtime, new bytes: the ctime (which no writer can set back) still moves,
    # so the revision does, and a fetch pinned to the old manifest is refused, never served mixed.
    model_dir = copy_model(model_root, tmp_path)
    s = stub(serve(tmp_path, chunk_bytes=4096).address)
    manifest = manifest_of(s)
    assemble(fetch(s, manifest_id=manifest.manifest_id), manifest)  # the server learns every digest
    shard = sorted(model_dir.glob("*.safetensors"))[-1]
    st = shard.stat()
    with shard.open("r+b") as f:
        f.seek(st.st_size - 64)
        f.write(bytes(64 * [0xAB]))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    fresh = manifest_of(s)
    assert fresh.revision != manifest.revision

    rpc_error(
        lambda: fetch(s, manifest_id=manifest.manifest_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "no longer matches model",
    )
    assemble(fetch(s, manifest_id=fresh.manifest_id), fresh)  # the new bytes, whole and verified
    assert s.ListModels(pb.ListModelsRequest()).models[0].name == MODEL


@pytest.mark.fault("checkpoint file truncated while served")
def test_file_truncated_while_served_is_data_loss_and_the_server_survives(
    model_root: Path, tmp_path: Path, serve, stub
) -> None:
    model_dir = copy_model(model_root, tmp_path)
    s = stub(serve(tmp_path, chunk_bytes=4096).address)
    manifest = manifest_of(s)  # opens the files
    shard = sorted(model_dir.glob("*.safetensors"))[-1]
    st = shard.stat()
    os.truncate(shard, st.st_size // 2)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime: only the size tells
    # The pinned manifest is stale (the size is part of the revision) and the file is
    # damaged: either answer is fair, a crash or INTERNAL is not.
    with pytest.raises(grpc.RpcError) as info:
        fetch(s, manifest_id=manifest.manifest_id)
    assert info.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DATA_LOSS)
    # Unpinned, the truncated file is DATA_LOSS naming the tensor it cut.
    rpc_error(lambda: fetch(s), grpc.StatusCode.DATA_LOSS, r"tensor '.*'.*past the data section")
    assert s.ListModels(pb.ListModelsRequest()).models[0].name == MODEL


@pytest.mark.fault("broken model directory beside good ones")
def test_a_broken_directory_does_not_hide_the_others_from_list_models(tmp_path: Path, model_root: Path) -> None:
    import shutil

    from weightserve.client import WeightClient
    from weightserve.config import ServerConfig
    from weightserve.testing import BackgroundServer

    root = tmp_path / "root"
    shutil.copytree(model_root, root)
    broken = root / "org" / "broken"
    broken.mkdir()
    (broken / "model.safetensors.index.json").write_text("{not json")
    (broken / "model-00001-of-00001.safetensors").write_bytes(b"")
    config = ServerConfig(model_roots=(root,), listen="127.0.0.1:0")
    with BackgroundServer(config) as server, WeightClient(server.address) as client:
        names = [m.name for m in client.list_models()]
    assert "org/tiny-llama" in names and "org/broken" not in names
