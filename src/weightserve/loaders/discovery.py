"""Which files of a model directory are weights, and in what order."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

from weightserve.errors import CorruptCheckpointError
from weightserve.loaders.access import read_text, reading
from weightserve.storage.selection import NOT_FOR_INFERENCE

_DIGITS = re.compile(r"(\d+)")


def natural_key(path: Path) -> tuple[object, ...]:
    """Sort key that puts model-2-of-10 before model-10-of-10."""
    return tuple(int(p) if p.isdigit() else p for p in _DIGITS.split(path.name))


def _weight_map(index: Path) -> dict[str, Any]:
    """An index json's weight_map (tensor name -> file name), as written.

    Raises:
        CorruptCheckpointError: not JSON, or no object under "weight_map".
        PreconditionError: the server may not read the index.
    """
    try:
        weight_map = json.loads(read_text(index))["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError) as e:  # RecursionError: nesting too deep
        raise CorruptCheckpointError(f"{index.name}: not a valid index json ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict):
        raise CorruptCheckpointError(f"{index.name}: not a valid index json (weight_map is not an object)")
    return weight_map


def _is_file(path: Path) -> bool:
    """Path.is_file, except that a name the OS refuses (too long, say) is no file either.

    A permission problem is left to raise: it is the operator's to fix, not corruption.
    """
    try:
        return path.is_file()
    except PermissionError:
        raise
    except OSError:  # ENAMETOOLONG: Path.is_file lets it through
        return False


def _shown(name: str) -> str:
    """A file name from an index, as quoted in a message: cut to 100 characters."""
    return repr(name) if len(name) <= 100 else f"{name[:100]!r}... ({len(name)} characters)"


_INDEX_MEMO: collections.OrderedDict[tuple[str, int, int, int, int], frozenset[str]] = collections.OrderedDict()
_INDEX_MEMO_SIZE = 64


def _file_names(index: Path) -> frozenset[str]:
    """The file names an index json's weight_map uses, parsed again only when the file changes.

    Every request checks its model's revision, which lists the files; an index of
    10,000 tensors took ~3 ms to parse, every time.
    """
    st = index.stat()
    key = (str(index), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    found = _INDEX_MEMO.get(key)
    if found is None:
        found = frozenset(str(name) for name in _weight_map(index).values())
        _INDEX_MEMO[key] = found
        while len(_INDEX_MEMO) > _INDEX_MEMO_SIZE:
            _INDEX_MEMO.popitem(last=False)
    return found


def files_from_index(model_dir: Path, index_name: str) -> list[Path] | None:
    """The files an index json's weight_map names, naturally sorted; None if no index.

    Raises:
        CorruptCheckpointError: the index is malformed or names a path outside the model.
        PreconditionError: the server may not read the index.
    """
    index = model_dir / index_name
    if not index.is_file():
        return None
    names = _file_names(index)
    files = []
    for name in names:
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or len(rel.parts) != 1:
            raise CorruptCheckpointError(
                f"{index.name}: weight file {_shown(name)} is not a file in the model directory"
            )
        path = model_dir / rel.name
        if not _is_file(path):
            raise CorruptCheckpointError(f"{index.name}: names {_shown(name)}, which does not exist")
        files.append(path)
    return sorted(files, key=natural_key)


def check_index(model_dir: Path, index_name: str, placed: dict[str, str]) -> None:
    """Every tensor the index's weight_map names is in the file it names.

    `placed` maps each tensor the loader found to its file's name. A tensor the index
    names but no file holds would otherwise be missing from every plan without a word.

    Raises:
        CorruptCheckpointError: names the first tensor that is missing or elsewhere.
        PreconditionError: the server may not read the index.
    """
    index = model_dir / index_name
    if not index.is_file():
        return
    expected = {name: PurePosixPath(str(file)).name for name, file in _weight_map(index).items()}
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
    """Weight files in `model_dir` (not recursive) with one of `suffixes`, naturally sorted.

    Raises:
        PreconditionError: the server may not list the directory.
    """
    with reading(model_dir):
        found = [
            p
            for p in model_dir.iterdir()
            if p.suffix in suffixes and p.is_file() and not NOT_FOR_INFERENCE.match(p.name)
        ]
    return sorted(found, key=natural_key)
