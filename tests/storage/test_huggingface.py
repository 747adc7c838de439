"""Hugging Face models, offline from a cache built in the real layout, and online against a fake Hub."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from weightserve.client import WeightClient
from weightserve.config import ServerConfig
from weightserve.errors import CorruptCheckpointError, FetchError, ModelNotFoundError, UnavailableError
from weightserve.loaders.formats import files_at
from weightserve.storage import storage_for
from weightserve.storage.base import parse_remote
from weightserve.storage.huggingface import HuggingFaceStorage

TINY = "org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tiny_files(model_root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (model_root / TINY).iterdir()}


# --------------------------------------------------------------------------- offline


@pytest.mark.parametrize("symlinks", [True, False], ids=["blob-symlinks", "plain-files"])
def test_offline_resolves_a_branch_from_the_cache(
    hf_offline: Path, model_root: Path, build_hf_cache: Any, symlinks: bool
) -> None:
    snapshot = build_hf_cache(hf_offline, TINY, COMMIT, model_root / TINY, symlinks=symlinks)
    backend = storage_for("hf", ServerConfig())
    assert isinstance(backend, HuggingFaceStorage) and backend.offline and backend.cache_dir == hf_offline

    location = backend.resolve(parse_remote(f"hf://{TINY}"))
    assert (location.source, location.model_dir, location.revision) == ("hf", snapshot, f"hf-{COMMIT}")
    found = files_at(location)
    assert found.format == "safetensors" and len(found.files) == 2 and found.revision == f"hf-{COMMIT}"
    assert backend.resolve(parse_remote(f"hf://{TINY}@{COMMIT}")).model_dir == snapshot


def test_offline_refuses_what_the_cache_lacks(hf_offline: Path, model_root: Path, build_hf_cache: Any) -> None:
    backend = storage_for("hf", ServerConfig())
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE=1"):
        backend.resolve(parse_remote(f"hf://{TINY}"))
    build_hf_cache(hf_offline, TINY, COMMIT, model_root / TINY, skip=("model-00002-of-00002.safetensors",))
    with pytest.raises(ModelNotFoundError, match="lacks"):
        backend.resolve(parse_remote(f"hf://{TINY}"))
    with pytest.raises(ModelNotFoundError, match="not in the Hugging Face cache"):
        backend.resolve(parse_remote(f"hf://{TINY}@other-branch"))
    for bad in ("hf://org/name/extra", "hf://org/name@../../escape", "hf://org/name@a b"):
        with pytest.raises(ModelNotFoundError, match="ORG/NAME"):
            backend.resolve(parse_remote(bad))


@pytest.mark.fault("remote source outside the allow-list")
def test_server_serves_hf_offline_and_denies_other_repos(
    hf_offline: Path, model_root: Path, build_hf_cache: Any, serve: Any, tmp_path: Path
) -> None:
    build_hf_cache(hf_offline, TINY, COMMIT, model_root / TINY)
    server = serve(model_root, allow_source=("hf://org/*",))
    with WeightClient(server.address) as client:
        local = client.fetch_state_dict(TINY)
        remote = client.fetch_state_dict(f"hf://{TINY}")
        assert remote.keys() == local.keys()
        for key, tensor in local.items():
            assert torch.equal(remote[key].view(torch.uint8), tensor.view(torch.uint8)), key
        manifest = client.get_manifest(f"hf://{TINY}")
        assert manifest is not None
        # snapshot files are symlinks into the repo's blobs: FetchFiles still sends them
        written = client.fetch_files(f"hf://{TINY}", tmp_path / "files")
        assert {p.name for p in written} >= {"config.json", "generation_config.json", "tokenizer_config.json"}
        assert (tmp_path / "files" / "config.json").read_bytes() == (model_root / TINY / "config.json").read_bytes()
        with pytest.raises(FetchError) as caught:
            client.fetch_state_dict("hf://other-org/tiny-llama")
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(FetchError) as caught:
            client.fetch_state_dict(f"s3://bucket/{TINY}")
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


# ---------------------------------------------------------------------------- online


@pytest.fixture
def hub_repo(hub_env: Any, model_root: Path) -> tuple[Any, str]:
    """org/tiny-llama on the fake Hub, with files a server must never download."""
    files = tiny_files(model_root) | {
        "optimizer.pt": b"optimizer",
        "training_args.bin": b"args",
        "pytorch_model.bin": b"the same weights, pickled",
        "unlisted.safetensors": b"not named by the index",
        "README.md": b"# card",
        "tokenizer.json": b"{}",
        "original/consolidated.00.pth": b"another layout",
    }
    return hub_env, hub_env.add(TINY, files)


EXPECTED = {
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer_config.json",
    "tokenizer.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
}


def downloaded(hub: Any) -> Counter[str]:
    return Counter(path.rsplit("/", 1)[1] for path in hub.requests("GET") if "/resolve/" in path)


def test_download_fetches_only_index_configs_and_named_weights(
    hub_repo: tuple[Any, str], tmp_path: Path, model_root: Path
) -> None:
    hub, commit = hub_repo
    backend = storage_for("hf", ServerConfig(disk_cache_dir=tmp_path))
    location = backend.resolve(parse_remote(f"hf://{TINY}"))

    assert hub.requests("GET")[0] == f"/api/models/{TINY}/revision/main"  # the commit first
    assert location.revision == f"hf-{commit}"
    assert location.model_dir == tmp_path / "hf" / "models--org--tiny-llama" / "snapshots" / commit
    assert set(downloaded(hub)) == EXPECTED and max(downloaded(hub).values()) == 1
    assert {p.name for p in location.model_dir.iterdir()} == EXPECTED
    for name in EXPECTED & set(tiny_files(model_root)):
        assert (location.model_dir / name).read_bytes() == (model_root / TINY / name).read_bytes()
    assert (tmp_path / "hf" / "models--org--tiny-llama" / "refs" / "main").read_text() == commit


def test_concurrent_resolves_download_each_file_once(hub_repo: tuple[Any, str], tmp_path: Path) -> None:
    hub, commit = hub_repo
    hub.delay = 0.05
    # two back ends over one cache directory: two servers on a shared volume
    backends = [HuggingFaceStorage(tmp_path / "hf", endpoint=hub.url) for _ in range(2)]
    results: list[Any] = [None, None]

    def resolve(i: int) -> None:
        results[i] = backends[i].resolve(parse_remote(f"hf://{TINY}"))

    threads = [threading.Thread(target=resolve, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results[0] == results[1] and results[0].revision == f"hf-{commit}"
    assert downloaded(hub) == Counter(EXPECTED)
    heads = Counter(path.rsplit("/", 1)[1] for path in hub.requests("HEAD"))
    assert heads == Counter(EXPECTED)  # the second resolve found every file cached: no request at all


def test_a_branch_resolves_to_its_commit(hub_repo: tuple[Any, str], tmp_path: Path, model_root: Path) -> None:
    hub, main_commit = hub_repo
    dev_files = tiny_files(model_root) | {"config.json": b'{"model_type": "llama", "dev": true}'}
    dev_commit = hub.add(TINY, dev_files, branch="dev")
    backend = HuggingFaceStorage(tmp_path / "hf", endpoint=hub.url)

    dev = backend.resolve(parse_remote(f"hf://{TINY}@dev"))
    main = backend.resolve(parse_remote(f"hf://{TINY}@main"))
    pinned = backend.resolve(parse_remote(f"hf://{TINY}@{main_commit}"))
    assert dev.revision == f"hf-{dev_commit}" and dev.model_dir.name == dev_commit
    assert main.revision == pinned.revision == f"hf-{main_commit}" != dev.revision
    assert (dev.model_dir / "config.json").read_bytes() == dev_files["config.json"]
    assert f"/api/models/{TINY}/revision/dev" in hub.requests("GET")
    # the same server later offline: the branch comes from refs/, with no request
    offline = HuggingFaceStorage(tmp_path / "hf", offline=True)
    before = len(hub.log)
    assert offline.resolve(parse_remote(f"hf://{TINY}@dev")) == dev
    assert len(hub.log) == before


def test_no_index_means_every_top_level_safetensors(hub_env: Any, tmp_path: Path) -> None:
    hub_env.add(
        "org/flat",
        {
            "a.safetensors": b"A",
            "b.safetensors": b"B",
            "config.json": b"{}",
            "optimizer.pt": b"no",
            "sub/c.safetensors": b"no",
        },
    )
    location = HuggingFaceStorage(tmp_path / "hf", endpoint=hub_env.url).resolve(parse_remote("hf://org/flat"))
    assert sorted(p.name for p in location.model_dir.iterdir()) == [
        "a.safetensors",
        "b.safetensors",
        "config.json",
    ]
    assert set(downloaded(hub_env)) == {"a.safetensors", "b.safetensors", "config.json"}


def test_hub_errors_become_weightserve_errors(hub_env: Any, tmp_path: Path) -> None:
    hub_env.add("org/broken", {"model.safetensors.index.json": b'{"weight_map": {"w": "gone.safetensors"}}'})
    backend = HuggingFaceStorage(tmp_path / "hf", endpoint=hub_env.url)
    with pytest.raises(ModelNotFoundError, match="RepositoryNotFound"):
        backend.resolve(parse_remote("hf://org/missing"))
    with pytest.raises(ModelNotFoundError, match="RevisionNotFound"):
        backend.resolve(parse_remote("hf://org/broken@no-such-branch"))
    with pytest.raises(CorruptCheckpointError, match=r"gone\.safetensors"):
        backend.resolve(parse_remote("hf://org/broken"))
    with pytest.raises(UnavailableError):
        HuggingFaceStorage(tmp_path / "hf", endpoint="http://127.0.0.1:9").resolve(parse_remote("hf://org/x"))
