"""What the client checks before it writes anything: requested names, the module it loads into, file streams.

Each check exists because the unchecked path gave a wrong result quietly: names that were
all unknown returned {}, a module of other shapes was half overwritten before the error,
a module on the meta device or with an expand()ed buffer failed deep inside a copy, and a
file stream that ended inside a file (or abandoned one for the next) returned as success.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import torch

from tests.client.test_client import MODEL, file_chunk, module_for, reference
from weightserve import AsyncWeightClient, FetchError, WeightClient
from weightserve.client.files import FileWriter
from weightserve.errors import InvalidRequestError


@pytest.fixture(scope="module")
def checkpoint(model_root: Path) -> dict[str, torch.Tensor]:
    return reference(model_root / MODEL)


def _shapes(checkpoint: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in checkpoint.items()}


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


def _untouched(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(t, before[name]) for name, t in module.state_dict().items())


# ----------------------------------------------------------------------- names


@pytest.mark.fault("names= the plan lacks", expect="NOT_FOUND naming them, in both clients; never an empty dict")
@pytest.mark.parametrize("names", [["model.nope"], ["model.norm.weight", "model.nope"]])
def test_unknown_names_are_not_found_not_an_empty_dict(client: WeightClient, address: str, names: list[str]) -> None:
    with pytest.raises(FetchError, match=r"model\.nope") as info:
        client.fetch_state_dict(MODEL, names=names)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    async def fetch() -> None:
        async with AsyncWeightClient(address) as c:
            await c.fetch_state_dict(MODEL, names=names)

    with pytest.raises(FetchError, match=r"model\.nope") as info:
        asyncio.run(fetch())
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_known_names_still_fetch_only_those(client: WeightClient, checkpoint: dict[str, torch.Tensor]) -> None:
    state = client.fetch_state_dict(MODEL, names=["model.norm.weight"])
    assert list(state) == ["model.norm.weight"]
    assert torch.equal(state["model.norm.weight"], checkpoint["model.norm.weight"])


# ----------------------------------------------------------------------- load_into


@pytest.mark.fault(
    "a module that does not fit the plan (shape, dtype, meta, overlapping)",
    expect="InvalidRequestError naming the tensors before any byte is fetched; the module untouched",
    cases=4,
)
def test_a_module_of_another_shape_or_dtype_is_refused_before_anything_is_written(
    client: WeightClient, checkpoint: dict[str, torch.Tensor]
) -> None:
    shapes = _shapes(checkpoint)
    shapes["model.norm.weight"] = (shapes["model.norm.weight"][0] + 1,)
    module = module_for(shapes)
    before = _snapshot(module)
    with pytest.raises(InvalidRequestError, match=r"model.norm.weight: module bfloat16\[\d+\], server bfloat16"):
        client.load_into(module, MODEL)
    assert _untouched(module, before)
    assert client.last_fetch_stats is None  # refused before any fetch

    integer = module_for(_shapes(checkpoint))
    norm = integer.model.norm  # type: ignore[union-attr]
    del norm.weight
    norm.register_buffer("weight", torch.zeros(checkpoint["model.norm.weight"].shape, dtype=torch.int32))
    with pytest.raises(InvalidRequestError, match=r"model\.norm\.weight: module int32"):
        client.load_into(integer, MODEL)


def test_a_module_on_the_meta_device_is_told_to_allocate_first(
    client: WeightClient, checkpoint: dict[str, torch.Tensor]
) -> None:
    with torch.device("meta"):
        module = module_for(_shapes(checkpoint))
    with pytest.raises(InvalidRequestError, match=r"meta device.*to_empty"):
        client.load_into(module, MODEL)
    module.to_empty(device="cpu")
    client.load_into(module, MODEL)
    assert all(torch.equal(t, checkpoint[name]) for name, t in module.state_dict().items())


def test_an_expanded_buffer_or_partly_shared_memory_is_refused(
    client: WeightClient, checkpoint: dict[str, torch.Tensor]
) -> None:
    module = module_for(_shapes(checkpoint))
    norm = module.model.norm  # type: ignore[union-attr]
    size = norm.weight.shape[0]
    del norm.weight
    norm.register_buffer("weight", torch.zeros(1, dtype=torch.bfloat16).expand(size))
    with pytest.raises(InvalidRequestError, match="share memory"):
        client.load_into(module, MODEL)

    module = module_for(_shapes(checkpoint))
    layer = module.get_submodule("model.layers.0")
    shared = torch.zeros(2 * size, dtype=torch.bfloat16)
    layer.input_layernorm.weight = torch.nn.Parameter(shared[:size])
    layer.post_attention_layernorm.weight = torch.nn.Parameter(shared[size // 2 : size // 2 + size])
    with pytest.raises(InvalidRequestError, match="share part of their memory"):
        client.load_into(module, MODEL)


def test_non_contiguous_and_castable_destinations_are_filled(
    client: WeightClient, checkpoint: dict[str, torch.Tensor]
) -> None:
    module = module_for(_shapes(checkpoint))
    name = next(n for n, t in checkpoint.items() if t.dim() == 2 and t.shape[0] != t.shape[1])
    *path, leaf = name.split(".")
    owner = module.get_submodule(".".join(path))
    rows, cols = checkpoint[name].shape
    transposed = torch.zeros(cols, rows, dtype=torch.bfloat16).t()  # the right shape, column-major
    setattr(owner, leaf, torch.nn.Parameter(transposed))
    module.model.norm.weight = torch.nn.Parameter(  # type: ignore[union-attr]
        torch.zeros(checkpoint["model.norm.weight"].shape, dtype=torch.float32)
    )
    client.load_into(module, MODEL)
    state = module.state_dict()
    assert not state[name].is_contiguous()
    for key, tensor in checkpoint.items():
        assert torch.equal(state[key].to(tensor.dtype), tensor), key


def test_tied_names_are_written_once_and_must_agree(client: WeightClient, checkpoint: dict[str, torch.Tensor]) -> None:
    assert checkpoint["lm_head.weight"].shape == checkpoint["model.embed_tokens.weight"].shape
    module = module_for(_shapes(checkpoint))
    module.lm_head.weight = module.model.embed_tokens.weight  # type: ignore[union-attr]
    with pytest.raises(InvalidRequestError, match=r"ties lm_head\.weight to model\.embed_tokens\.weight"):
        client.load_into(module, MODEL)


def test_load_into_refuses_options_the_module_decides(
    client: WeightClient, checkpoint: dict[str, torch.Tensor]
) -> None:
    module = module_for(_shapes(checkpoint))
    for option in ({"device": "cpu"}, {"dtype": torch.float32}, {"destinations": {}}):
        with pytest.raises(TypeError, match="drop"):
            client.load_into(module, MODEL, **option)  # type: ignore[arg-type]


def test_async_load_into_fills_the_module(address: str, checkpoint: dict[str, torch.Tensor]) -> None:
    module = module_for(_shapes(checkpoint))
    pointers = {name: t.data_ptr() for name, t in module.state_dict().items()}

    async def load() -> None:
        async with AsyncWeightClient(address) as c:
            await c.load_into(module, MODEL)

    asyncio.run(load())
    state = module.state_dict()
    assert {name: t.data_ptr() for name, t in state.items()} == pointers
    assert all(torch.equal(t, checkpoint[name]) for name, t in state.items())


# ----------------------------------------------------------------------- file streams


@pytest.mark.fault(
    "a file stream cut short, out of order or naming no file",
    expect="DATA_LOSS naming the file; no partial or misplaced file left",
    cases=6,
)
@pytest.mark.parametrize(
    ("chunks", "says"),
    [
        ([file_chunk(".", b"abc")], "naming no file"),
        ([file_chunk("", b"abc")], "naming no file"),
        ([file_chunk("sub/..", b"abc")], "outside the destination"),
        ([file_chunk("a.json", b"abc"), file_chunk("a.json", b"abc")], "twice"),
        ([file_chunk("a.json", b"abc", size=6, last=False), file_chunk("b.json", b"abc")], "before its last chunk"),
        ([file_chunk("a.json", b"abcdef", size=4, last=False)], "runs past"),
    ],
)
def test_file_streams_that_do_not_deliver_whole_files_are_data_loss(tmp_path: Path, chunks: list, says: str) -> None:
    writer = FileWriter(tmp_path)
    with pytest.raises(FetchError, match=says) as info:
        for chunk in chunks:
            writer.accept(chunk)
    writer.abort()
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    assert {p.name for p in tmp_path.iterdir()} <= {"a.json"}  # at most the one whole file before the fault


def test_a_stream_ending_inside_a_file_is_data_loss(tmp_path: Path) -> None:
    writer = FileWriter(tmp_path)
    writer.accept(file_chunk("whole.json", b"{}"))
    writer.accept(file_chunk("cut.json", b"abc", size=6, last=False))
    with pytest.raises(FetchError, match=r"ended inside cut.json, at byte 3 of its 6") as info:
        writer.finish()
    writer.abort()
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    assert [p.name for p in tmp_path.iterdir()] == ["whole.json"]
