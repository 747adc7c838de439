"""WeightClient and AsyncWeightClient against a real server: state dicts, files, modules, errors."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import tempfile
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from weightserve import AsyncWeightClient, FetchError, WeightClient, WeightserveError, wire
from weightserve.client import FetchStats
from weightserve.client.files import FileWriter
from weightserve.config import ServerConfig
from weightserve.errors import InvalidRequestError
from weightserve.testing import BackgroundServer
from weightserve.v1 import weightserve_pb2 as pb

MODEL = "org/tiny-llama"
CONFIG_FILES = {"config.json", "generation_config.json", "tokenizer_config.json"}


def raw(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def reference(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def assert_bitwise_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(raw(got[name]), raw(tensor)), name


# ------------------------------------------------------------------- state dicts


def test_fetch_state_dict_equals_the_files(client: WeightClient, model_root: Path) -> None:
    state = client.fetch_state_dict(MODEL)
    assert_bitwise_equal(state, reference(model_root / MODEL))
    stats = client.last_stats
    assert stats is not None and stats.attempts == 1 and stats.reconnects == 0
    assert stats.payload_bytes == sum(t.numel() * t.element_size() for t in state.values())


def test_async_fetch_state_dict_equals_the_files(address: str, model_root: Path) -> None:
    async def main() -> dict[str, torch.Tensor]:
        async with AsyncWeightClient(address) as c:
            models = await c.list_models()
            assert [m.name for m in models] == [MODEL]
            return await c.fetch_state_dict(MODEL)

    assert_bitwise_equal(asyncio.run(main()), reference(model_root / MODEL))


def test_fetch_state_dict_with_names(client: WeightClient, model_root: Path) -> None:
    ref = reference(model_root / MODEL)
    names = ["lm_head.weight", "model.layers.1.self_attn.k_proj.weight", "model.norm.weight"]
    state = client.fetch_state_dict(MODEL, names=names)
    assert_bitwise_equal(state, {n: ref[n] for n in names})


def test_async_fetch_state_dict_with_names_and_dtype(address: str, model_root: Path) -> None:
    ref = reference(model_root / MODEL)
    names = ["model.embed_tokens.weight"]

    async def main() -> dict[str, torch.Tensor]:
        async with AsyncWeightClient(address) as c:
            return await c.fetch_state_dict(MODEL, names=names, dtype=torch.float32)

    state = asyncio.run(main())
    assert list(state) == names
    assert state[names[0]].dtype == torch.float32
    assert torch.equal(state[names[0]], ref[names[0]].to(torch.float32))


def test_dtype_converts_floating_tensors_only(tmp_path: Path, serve) -> None:
    tensors = {
        "w": torch.arange(12, dtype=torch.float32).reshape(3, 4).to(torch.bfloat16),
        "h": torch.arange(6, dtype=torch.float16),
        "ids": torch.arange(5, dtype=torch.int64),
        "mask": torch.arange(4) % 2 == 0,
    }
    (tmp_path / "org" / "mixed").mkdir(parents=True)
    save_file(tensors, str(tmp_path / "org" / "mixed" / "model.safetensors"))
    with WeightClient(serve(tmp_path).address) as c:
        state = c.fetch_state_dict("org/mixed", dtype=torch.float32)
    assert state["w"].dtype == torch.float32 and torch.equal(state["w"], tensors["w"].float())
    assert state["h"].dtype == torch.float32 and torch.equal(state["h"], tensors["h"].float())
    assert_bitwise_equal({k: state[k] for k in ("ids", "mask")}, {k: tensors[k] for k in ("ids", "mask")})


def test_every_dtype_and_empty_tensors_round_trip(tmp_path: Path, serve) -> None:
    tensors = {}
    for name in wire.DTYPE_SIZES:
        dtype = wire.torch_dtype(name)
        if dtype == torch.bool:
            tensors[name] = (torch.arange(15) % 3 == 0).reshape(3, 5)
        else:
            tensors[name] = (
                (torch.arange(15 * wire.DTYPE_SIZES[name]) * 7 % 251).to(torch.uint8).view(dtype).reshape(3, 5)
            )
    tensors["empty"] = torch.arange(0, dtype=torch.float32).reshape(0, 7)
    tensors["scalar"] = torch.tensor(2.5, dtype=torch.float64)
    (tmp_path / "org" / "dtypes").mkdir(parents=True)
    save_file(tensors, str(tmp_path / "org" / "dtypes" / "model.safetensors"))
    with WeightClient(serve(tmp_path).address) as c:
        assert_bitwise_equal(c.fetch_state_dict("org/dtypes"), tensors)


# ------------------------------------------------------------------------ errors


def test_unknown_model_is_a_not_found_fetch_error(client: WeightClient) -> None:
    with pytest.raises(FetchError) as info:
        client.fetch_state_dict("org/nope")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert isinstance(info.value, WeightserveError)
    assert "org/nope" in str(info.value)
    for call in (
        lambda: client.get_manifest("org/nope"),
        lambda: client.fetch_files("org/nope", "/nonexistent"),
    ):
        with pytest.raises(FetchError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_async_unknown_model_is_a_not_found_fetch_error(address: str) -> None:
    async def main() -> None:
        async with AsyncWeightClient(address) as c:
            await c.fetch_state_dict("org/nope")

    with pytest.raises(FetchError) as info:
        asyncio.run(main())
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert isinstance(info.value, WeightserveError)


def test_bad_rank_is_an_invalid_argument_fetch_error(client: WeightClient) -> None:
    with pytest.raises(FetchError) as info:
        client.fetch_state_dict(MODEL, rank=3, world_size=2)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "rank 3" in info.value.details()


def test_wrong_revision_is_a_failed_precondition_fetch_error(client: WeightClient) -> None:
    with pytest.raises(FetchError) as info:
        client.fetch_state_dict(MODEL, revision="local-0000")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_options_are_keyword_only_and_checked(client: WeightClient) -> None:
    with pytest.raises(TypeError, match="nmes"):
        client.fetch_state_dict(MODEL, nmes=["model.norm.weight"])  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        client.fetch_state_dict(MODEL, 0, 1, ["model.norm.weight"])  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="drop device"):
        client.load_into(torch.nn.Linear(2, 2), MODEL, device="cpu")


# ------------------------------------------------------------------------- files


def test_fetch_files_writes_configs_atomically(client: WeightClient, model_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    written = client.fetch_files(MODEL, out)
    assert {p.name for p in written} == CONFIG_FILES
    assert all(p.parent == out.resolve() for p in written)
    for name in CONFIG_FILES:
        assert (out / name).read_bytes() == (model_root / MODEL / name).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(CONFIG_FILES)  # no .part leftovers


def test_async_fetch_files(address: str, model_root: Path, tmp_path: Path) -> None:
    async def main() -> list[Path]:
        async with AsyncWeightClient(address) as c:
            return await c.fetch_files(MODEL, tmp_path, patterns=["config.json"])

    assert [p.name for p in asyncio.run(main())] == ["config.json"]
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def file_chunk(path: str, data: bytes, *, offset: int = 0, size: int | None = None, last: bool = True) -> pb.FileChunk:
    size = len(data) if size is None else size
    return pb.FileChunk(
        path=path,
        offset=offset,
        size=size,
        data=data,
        crc32c=wire.crc32c(data),
        last=last,
        file_crc32c=wire.crc32c(data) if last else 0,
    )


def test_file_writer_commits_only_whole_verified_files(tmp_path: Path) -> None:
    writer = FileWriter(tmp_path)
    writer.accept(file_chunk("a.json", b"abc", size=6, last=False))
    assert not (tmp_path / "a.json").exists()  # nothing visible until the last chunk
    whole = b"abcdef"
    writer.accept(
        pb.FileChunk(
            path="a.json",
            offset=3,
            size=6,
            data=b"def",
            crc32c=wire.crc32c(b"def"),
            last=True,
            file_crc32c=wire.crc32c(whole),
        )
    )
    assert (tmp_path / "a.json").read_bytes() == whole
    assert writer.written == [tmp_path.resolve() / "a.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


@pytest.mark.fault("bad FileChunk (crc, size, offset, path)", cases=6)
def test_file_writer_refuses_bad_chunks_and_leaves_nothing_behind(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    bad_crc = file_chunk("a.json", b"abc")
    bad_crc.crc32c ^= 1
    bad_file_crc = file_chunk("b.json", b"abc")
    bad_file_crc.file_crc32c ^= 1
    cases = [
        (bad_crc, "failed its crc32c"),
        (bad_file_crc, "whole-file crc32c or size mismatch"),
        (file_chunk("c.json", b"abc", size=10), "size mismatch"),
        (file_chunk("d.json", b"abc", offset=5), "first chunk starts at byte 5"),
        (file_chunk("../escape.json", b"abc"), "outside the destination"),
        (file_chunk("/etc/escape.json", b"abc"), "outside the destination"),
    ]
    for chunk, message in cases:
        writer = FileWriter(dest)
        with pytest.raises(FetchError, match=message) as info:
            writer.accept(chunk)
        assert info.value.code() == grpc.StatusCode.DATA_LOSS
        writer.abort()
    assert list(dest.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]


@pytest.mark.fault("bad FileChunk (crc, size, offset, path)")
def test_file_writer_abort_drops_a_half_written_file(tmp_path: Path) -> None:
    writer = FileWriter(tmp_path)
    writer.accept(file_chunk("a.json", b"abc", size=6, last=False))
    assert len(list(tmp_path.iterdir())) == 1  # the temp file
    writer.abort()
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------- modules


def module_for(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """A module whose state_dict keys are exactly `shapes`' names (nested like Hugging Face's)."""
    root = torch.nn.Module()
    for name, shape in shapes.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape, dtype=dtype)))
    return root


def test_load_into_writes_straight_into_the_parameters(client: WeightClient, model_root: Path) -> None:
    ref = reference(model_root / MODEL)
    module = module_for({name: tuple(t.shape) for name, t in ref.items()})
    pointers = {name: t.data_ptr() for name, t in module.state_dict().items()}

    client.load_into(module, MODEL)

    state = module.state_dict()
    assert {name: t.data_ptr() for name, t in state.items()} == pointers
    assert_bitwise_equal(dict(state), ref)
    assert all(isinstance(p, torch.nn.Parameter) for p in module.parameters())


def test_destinations_are_filled_in_place_not_copied(client: WeightClient, model_root: Path) -> None:
    ref = reference(model_root / MODEL)
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    destinations = {n: torch.empty_like(ref[n]) for n in names}
    state = client.fetch_state_dict(MODEL, names=names, destinations=destinations)
    assert all(state[n] is destinations[n] for n in names)
    assert_bitwise_equal(state, {n: ref[n] for n in names})


def test_load_into_a_float32_module_converts(client: WeightClient, model_root: Path) -> None:
    ref = reference(model_root / MODEL)
    module = module_for({name: tuple(t.shape) for name, t in ref.items()}, dtype=torch.float32)
    pointers = {name: t.data_ptr() for name, t in module.state_dict().items()}
    client.load_into(module, MODEL)
    state = module.state_dict()
    assert {name: t.data_ptr() for name, t in state.items()} == pointers
    for name, tensor in ref.items():
        assert torch.equal(state[name], tensor.to(torch.float32)), name


def test_load_into_with_mismatched_keys_names_them(client: WeightClient, model_root: Path) -> None:
    shapes = {name: tuple(t.shape) for name, t in reference(model_root / MODEL).items()}
    del shapes["lm_head.weight"]
    shapes["extra.bias"] = (4,)
    module = module_for(shapes)
    before = {name: t.clone() for name, t in module.state_dict().items()}

    with pytest.raises(InvalidRequestError) as info:
        client.load_into(module, MODEL)

    message = str(info.value)
    assert "extra.bias" in message and "lm_head.weight" in message
    assert "missing from the server ['extra.bias']" in message
    assert "not in the module ['lm_head.weight']" in message
    assert all(torch.equal(t, before[name]) for name, t in module.state_dict().items())  # untouched


# ------------------------------------------------------------------- unix socket


def test_unix_socket_address(model_root: Path) -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as short:  # socket paths must stay < 108 bytes
        socket = Path(short) / "ws.sock"
        config = ServerConfig(model_roots=(model_root,), listen=f"unix:{socket}", metrics_listen="off")
        with BackgroundServer(config) as server:
            assert server.address == f"unix:{socket}"
            assert socket.exists()
            for address in (server.address, str(socket)):  # "unix:/path" and a bare "/path"
                with WeightClient(address) as c:
                    assert [m.name for m in c.list_models()] == [MODEL]
                    assert_bitwise_equal(c.fetch_state_dict(MODEL), reference(model_root / MODEL))


# ---------------------------------------------------------------- prefetch/evict


def test_prefetch_and_evict(client: WeightClient) -> None:
    manifest = client.get_manifest(MODEL)
    response = client.prefetch(MODEL)
    assert (response.revision, response.bytes) == (manifest.revision, manifest.total_bytes)
    assert client.evict(MODEL) is True
    assert client.evict(MODEL) is False


def test_evict_of_an_unknown_model_is_not_found(client: WeightClient) -> None:
    with pytest.raises(FetchError) as info:
        client.evict("org/nope")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


# ------------------------------------------------------------- what a fetch did


def check_stats(stats: FetchStats | None, state: dict[str, torch.Tensor], address: str) -> FetchStats:
    assert stats is not None
    assert stats.tensors == len(state)
    assert stats.payload_bytes == sum(t.numel() * t.element_size() for t in state.values())
    assert stats.time_to_first_chunk is not None and 0 < stats.time_to_first_chunk <= stats.seconds
    assert (stats.resumes, stats.rerequests, stats.replica) == (0, 0, address)
    return stats


def test_last_fetch_stats_and_the_summary_line(
    client: WeightClient, address: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="weightserve.client"):
        state = client.fetch_state_dict(MODEL, rank=1, world_size=2)
    stats = check_stats(client.last_fetch_stats, state, address)
    assert client.last_stats is stats  # the name it had first
    (record,) = [r for r in caplog.records if r.name == "weightserve.client"]
    assert record.levelno == logging.INFO
    line = record.getMessage()
    assert line.startswith(f"fetched {MODEL} rank 1/2: {len(state)} tensors, ")
    assert re.search(r" in \d+\.\d\d s \(\d+\.\d\d GB/s\), first chunk after \d+\.\d\d s, ", line), line
    assert line.endswith(f", 0 resumes, 0 re-requests from {address}")


def test_async_last_fetch_stats(address: str) -> None:
    async def main() -> tuple[dict[str, torch.Tensor], FetchStats | None]:
        async with AsyncWeightClient(address) as c:
            return await c.fetch_state_dict(MODEL), c.last_fetch_stats

    state, stats = asyncio.run(main())
    check_stats(stats, state, address)


def test_fetch_stats_summary_reads_like_a_person_wrote_it() -> None:
    stats = FetchStats(payload_bytes=1_200_000_000, tensors=812, seconds=1.4, time_to_first_chunk=0.05)
    stats.replica, stats.reconnects = "weights:50051", 2
    assert stats.summary() == (
        "812 tensors, 1.2 GB in 1.40 s (0.86 GB/s), first chunk after 0.05 s, 2 resumes, 0 re-requests "
        "from weights:50051"
    )


# ------------------------------------------------------------- devices


@pytest.mark.timeout(20)
@pytest.mark.parametrize("build", ["cpu-only torch", "no GPU visible"])
def test_cuda_without_cuda_is_a_failed_precondition_before_any_call(
    monkeypatch: pytest.MonkeyPatch, build: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None if build == "cpu-only torch" else "12.4")
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    said = "has no CUDA build" if build == "cpu-only torch" else "no CUDA device is visible"
    # nothing listens there: a network call would wait out the client's timeout, not fail at once
    with WeightClient("127.0.0.1:9", timeout=600) as c:
        with pytest.raises(FetchError, match=said) as info:
            c.fetch_state_dict(MODEL, device="cuda")
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert c.last_fetch_stats is None

    async def fetch_async() -> None:
        async with AsyncWeightClient("127.0.0.1:9", timeout=600) as c:
            await c.fetch_state_dict(MODEL, device="cuda:0")

    with pytest.raises(FetchError, match=said):
        asyncio.run(fetch_async())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fetch_to_cuda_equals_the_files(client: WeightClient, model_root: Path, address: str) -> None:
    state = client.fetch_state_dict(MODEL, device="cuda")
    assert all(t.device.type == "cuda" for t in state.values())
    assert_bitwise_equal({k: v.cpu() for k, v in state.items()}, reference(model_root / MODEL))
    check_stats(client.last_fetch_stats, state, address)
    with pytest.raises(FetchError, match="CUDA device") as info:
        client.fetch_state_dict(MODEL, device=f"cuda:{torch.cuda.device_count()}")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
