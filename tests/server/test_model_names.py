"""One model, one name: every spelling of a model's name reaches the same cache entry and mapping."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from weightserve.client import WeightClient
from weightserve.errors import FetchError
from weightserve.storage.base import canonical_name

SPELLINGS = ["org/tiny-llama", "org//tiny-llama", "./org/tiny-llama", "org/tiny-llama/", "org/./tiny-llama"]


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("llama//small", "llama/small"),
        ("./llama/small", "llama/small"),
        ("llama/small/", "llama/small"),
        ("llama/small", "llama/small"),
        ("hf://org//m/@main", "hf://org/m@main"),
        ("s3://bucket/./prefix/", "s3://bucket/prefix"),
        ("../escape", "../escape"),  # kept: the resolver refuses it as NOT_FOUND
        ("/abs/path", "/abs/path"),
    ],
)
def test_canonical_name(name: str, canonical: str) -> None:
    assert canonical_name(name) == canonical


def test_every_spelling_is_one_cache_entry(model_root: Path, serve) -> None:  # type: ignore[no-untyped-def]
    server = serve(model_root, cache_memory=64 << 20)
    with WeightClient(server.address) as client:
        manifests = {client.get_manifest(name).manifest_id for name in SPELLINGS}
        for name in SPELLINGS:
            client.fetch_state_dict(name)
        entries = server.server.cache.open_entries()
        assert len(manifests) == 1
        assert [e.name for e in entries] == ["org/tiny-llama"]
        assert client.evict("org//tiny-llama/")  # evicting one spelling evicts the model
        assert server.server.cache.open_entries() == []


@pytest.mark.fault("model name or symlink escaping the roots", cases=3)
def test_escaping_names_stay_not_found(model_root: Path, serve) -> None:  # type: ignore[no-untyped-def]
    server = serve(model_root)
    with WeightClient(server.address) as client:
        for name in ("../org/tiny-llama", "/org/tiny-llama", "org/../../x"):
            with pytest.raises(FetchError) as info:
                client.get_manifest(name)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND, name
