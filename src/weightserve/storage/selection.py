"""Which files of a remote model to download, decided from its file listing.

A remote repository or bucket prefix often holds more than a server needs: several
weight formats, optimizer state, training logs, sub-folders of originals. The choice
mirrors the local loaders (an index json names exactly the weight files; without one,
every top-level file of the preferred format), so a download fetches what the loaders
will read and nothing else. Pure functions over names; storage may not import loaders,
so the names both need (index files, training leftovers) live here and loaders import them.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Callable, Collection, Iterable
from pathlib import PurePosixPath

from weightserve.errors import CorruptCheckpointError, ModelNotFoundError

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
INDEX_NAMES = (SAFETENSORS_INDEX, TORCH_INDEX)

CONFIG_PATTERNS = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.tiktoken",
    "chat_template.json",
    "chat_template.jinja",
)
"""Non-weight files a worker may ask for (FetchFiles) or slicing reads (config.json)."""

TORCH_SUFFIXES = (".bin", ".pt", ".pth")

# Files that sit beside weights in training outputs and are never needed to serve
# (loaders.discovery uses the same rule for local directories).
NOT_FOR_INFERENCE = re.compile(
    r"^(training_args|optimizer|scheduler|scaler|trainer_state|rng_state.*|adapter_model)\.(bin|pt|pth)$"
)


def top_level(names: Iterable[str]) -> list[str]:
    """Names of files directly in the model's folder (sub-folders are never served)."""
    return sorted(n for n in names if n and "/" not in n and not n.startswith("."))


def matching(names: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """Top-level `names` that match any of the fnmatch `patterns` (case-sensitive)."""
    patterns = list(patterns)
    return [n for n in top_level(names) if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def metadata_names(names: Collection[str]) -> list[str]:
    """The first files to fetch: the index json(s) and the config/tokenizer files."""
    return matching(names, INDEX_NAMES + CONFIG_PATTERNS)


def names_from_index(text: str, index_name: str) -> list[str]:
    """The weight files an index json's weight_map names, sorted.

    Raises:
        CorruptCheckpointError: not a valid index, or a name outside the model's folder.
    """
    try:
        names = set(json.loads(text)["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        # RecursionError: json nested past the interpreter's limit (a hostile index).
        raise CorruptCheckpointError(f"{index_name}: not a valid index json ({type(e).__name__}: {e})") from None
    for name in names:
        if not isinstance(name, str):
            raise CorruptCheckpointError(f"{index_name}: weight file {name!r} is not a file name")
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or len(rel.parts) != 1 or name.endswith("/"):
            raise CorruptCheckpointError(f"{index_name}: weight file {name!r} is not a file in the model's folder")
    return sorted(names)


def weight_names(names: Collection[str], read_index: Callable[[str], str], label: str) -> list[str]:
    """The weight files to serve, in the loaders' order of preference.

    `names` is the model's file listing; `read_index(name)` returns an index json's
    text (the caller fetched it with the metadata files). The result may name files the
    listing lacks; the caller decides whether that is corruption or an incomplete cache.

    Raises:
        ModelNotFoundError: there are no weights at all.
        CorruptCheckpointError: an index json is malformed.
    """
    files = set(top_level(names))
    if SAFETENSORS_INDEX in files:
        return names_from_index(read_index(SAFETENSORS_INDEX), SAFETENSORS_INDEX)
    safetensors = [n for n in files if n.endswith(".safetensors")]
    if safetensors:
        return sorted(safetensors)
    if TORCH_INDEX in files:
        return names_from_index(read_index(TORCH_INDEX), TORCH_INDEX)
    torch_files = [n for n in files if n.endswith(TORCH_SUFFIXES) and not NOT_FOR_INFERENCE.match(n)]
    if torch_files:
        return sorted(torch_files)
    raise ModelNotFoundError(f"{label}: no weights found (no .safetensors, .bin, .pt or .pth at the top level)")
