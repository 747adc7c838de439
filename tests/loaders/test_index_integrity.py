"""What the index says is what is served: every tensor it names, from the file it names, inside the model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from weightserve.errors import CorruptCheckpointError, ModelNotFoundError
from weightserve.loaders import loader_for
from weightserve.loaders.formats import model_files


def write_indexed(model_dir: Path, fmt: str = "safetensors") -> dict[str, str]:
    """Two weight files and an index naming both tensors; returns the weight map."""
    model_dir.mkdir(parents=True)
    weight_map = {}
    for i, name in enumerate(("a.weight", "b.weight")):
        filename = f"model-{i + 1:05d}-of-00002.{'safetensors' if fmt == 'safetensors' else 'bin'}"
        tensors = {name: torch.full((4,), float(i))}
        if fmt == "safetensors":
            save_file(tensors, str(model_dir / filename))
        else:
            torch.save(tensors, model_dir / filename)
        weight_map[name] = filename
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (model_dir / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def open_model(model_dir: Path) -> None:
    found = model_files(model_dir)
    with loader_for(found.format)(found.files):
        pass


@pytest.mark.fault("malformed or lying index json")
@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_an_index_naming_a_tensor_no_file_holds_fails_naming_it(tmp_path: Path, fmt: str) -> None:
    model_dir = tmp_path / "m"
    weight_map = write_indexed(model_dir, fmt)
    index = next(model_dir.glob("*.index.json"))
    weight_map["c.weight"] = weight_map["a.weight"]  # named, but in no file
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(
        CorruptCheckpointError, match=r"names tensor 'c.weight' in model-00001-of-00002.* no weight file"
    ):
        open_model(model_dir)


@pytest.mark.fault("malformed or lying index json")
def test_an_index_placing_a_tensor_in_the_wrong_file_fails(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    weight_map = write_indexed(model_dir)
    weight_map["a.weight"], weight_map["b.weight"] = weight_map["b.weight"], weight_map["a.weight"]
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(
        CorruptCheckpointError, match=r"puts tensor 'a.weight' in model-00002.* but it is in model-00001"
    ):
        open_model(model_dir)


def test_a_consistent_index_opens(tmp_path: Path) -> None:
    write_indexed(tmp_path / "m")
    open_model(tmp_path / "m")


@pytest.mark.fault("model name or symlink escaping the roots")
@pytest.mark.parametrize("indexed", [True, False])
def test_a_weight_file_symlinked_out_of_the_model_is_not_found(tmp_path: Path, indexed: bool) -> None:
    model_dir = tmp_path / "root" / "m"
    write_indexed(model_dir)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    victim = model_dir / "model-00002-of-00002.safetensors"
    shutil.move(victim, outside / victim.name)
    victim.symlink_to(outside / victim.name)
    if not indexed:
        (model_dir / "model.safetensors.index.json").unlink()
    with pytest.raises(ModelNotFoundError, match=r"model-00002-of-00002.safetensors resolves outside"):
        model_files(model_dir)


def test_a_symlink_inside_the_model_is_served(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    write_indexed(model_dir)
    (model_dir / "blobs").mkdir()
    victim = model_dir / "model-00002-of-00002.safetensors"
    shutil.move(victim, model_dir / "blobs" / "x")
    victim.symlink_to(model_dir / "blobs" / "x")
    open_model(model_dir)
