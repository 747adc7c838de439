"""Which files of a model directory are weights, and in what order."""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath

from weightserve.errors import CorruptCheckpointError
from weightserve.storage.selection import NOT_FOR_INFERENCE

_DIGITS = re.compile(r"(\d+)")


def natural_key(path: Path) -> tuple[object, ...]:
    """Sort key that puts model-2-of-10 before model-10-of-10."""
    return tuple(int(p) if p.isdigit() else p for p in _DIGITS.split(path.name))


def files_from_index(model_dir: Path, index_name: str) -> list[Path] | None:
    """The files an index json's weight_map names, naturally sorted; None if no index.

    Raises:
        CorruptCheckpointError: the index is malformed or names a path outside the model.
    """
    index = model_dir / index_name
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = set(weight_map.values())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptCheckpointError(f"{index.name}: not a valid index json ({e})") from None
    files = []
    for name in names:
        rel = PurePosixPath(str(name))
        if rel.is_absolute() or ".." in rel.parts or len(rel.parts) != 1:
            raise CorruptCheckpointError(f"{index.name}: weight file {name!r} is not a file in the model directory")
        path = model_dir / rel.name
        if not path.is_file():
            raise CorruptCheckpointError(f"{index.name}: names {name!r}, which does not exist")
        files.append(path)
    return sorted(files, key=natural_key)


def check_index(model_dir: Path, index_name: str, placed: dict[str, str]) -> None:
    """Every tensor the index's weight_map names is in the file it names.

    `placed` maps each tensor the loader found to its file's name. A tensor the index
    names but no file holds would otherwise be missing from every plan without a word.

    Raises:
        CorruptCheckpointError: names the first tensor that is missing or elsewhere.
    """
    index = model_dir / index_name
    if not index.is_file():
        return
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        expected = {str(name): PurePosixPath(str(file)).name for name, file in weight_map.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptCheckpointError(f"{index.name}: not a valid index json ({e})") from None
    missing = sorted(name for name in expected if name not in placed)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CorruptCheckpointError(
            f"{index.name} names tensor {missing[0]!r}{more} in {expected[missing[0]]}, but no weight file holds it"
        )
    moved = sorted(name for name, file in expected.items() if placed[name] != file)
    if moved:
        raise CorruptCheckpointError(
            f"{index.name} puts tensor {moved[0]!r} in {expected[moved[0]]}, but it is in {placed[moved[0]]}"
        )


def files_by_suffix(model_dir: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Weight files in `model_dir` (not recursive) with one of `suffixes`, naturally sorted."""
    found = [
        p for p in model_dir.iterdir() if p.suffix in suffixes and p.is_file() and not NOT_FOR_INFERENCE.match(p.name)
    ]
    return sorted(found, key=natural_key)
