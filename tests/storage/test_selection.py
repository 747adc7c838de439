"""Which files of a remote model are downloaded: index first, never training leftovers."""

from __future__ import annotations

import json

import pytest

from weightserve.errors import CorruptCheckpointError, ModelNotFoundError
from weightserve.storage.selection import metadata_names, names_from_index, weight_names


def index(*names: str) -> str:
    return json.dumps({"metadata": {}, "weight_map": {f"t{i}": n for i, n in enumerate(names)}})


LISTING = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "README.md",
    "model.safetensors.index.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "extra.safetensors",
    "pytorch_model.bin",
    "optimizer.pt",
    "training_args.bin",
    "original/params.json",
    ".gitattributes",
]


def test_metadata_is_the_index_and_config_files_at_the_top_level() -> None:
    assert metadata_names(LISTING) == [
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_an_index_names_exactly_the_weights() -> None:
    text = index(
        "model-00002-of-00002.safetensors",
        "model-00001-of-00002.safetensors",
        "model-00001-of-00002.safetensors",
    )
    assert weight_names(LISTING, lambda name: text, "m") == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]


def test_without_an_index_the_preferred_format_minus_leftovers() -> None:
    no_index = [n for n in LISTING if n != "model.safetensors.index.json"]
    assert weight_names(no_index, lambda n: "", "m") == [
        "extra.safetensors",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    torch_only = ["config.json", "pytorch_model.bin", "optimizer.pt", "training_args.bin", "rng_state_0.pth"]
    assert weight_names(torch_only, lambda n: "", "m") == ["pytorch_model.bin"]
    sharded = ["pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin", "x.bin"]
    assert weight_names(sharded, lambda n: index("pytorch_model-00001-of-00002.bin"), "m") == [
        "pytorch_model-00001-of-00002.bin"
    ]
    with pytest.raises(ModelNotFoundError, match="no weights"):
        weight_names(["config.json", "sub/model.safetensors"], lambda n: "", "m")


@pytest.mark.parametrize(
    "bad",
    [
        "not json",
        '{"weight_map": 3}',
        index("../escape.safetensors"),
        index("a/b.bin"),
        index("model.safetensors/"),
        index(""),
        '{"weight_map": {"w": 7}}',
        '{"weight_map": {"w": ["a"]}}',
    ],
)
def test_a_bad_index_is_corrupt(bad: str) -> None:
    with pytest.raises(CorruptCheckpointError):
        names_from_index(bad, "model.safetensors.index.json")
