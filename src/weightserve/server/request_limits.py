"""Static limits on one request, checked at the edge before any work.

Each limit is generous for any real model and tight enough that one request cannot
make the server allocate, walk or log without bound. Breaking one is INVALID_ARGUMENT
naming the limit (a client never retries it); limits that depend on the model (a
pipeline size above its layer count, more expert slots than its experts fill) are
checked where the model is known (sharding/, server/control_plane.py).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

from weightserve.errors import InvalidRequestError
from weightserve.storage.local import check_parts

MAX_MODEL_NAME_BYTES = 1024
MAX_MODEL_NAME_PARTS = 32
MAX_REVISION_BYTES = 256
MAX_FORMAT_BYTES = 64
MAX_TENSOR_NAME_BYTES = 4096
MAX_NAMES = 1_000_000
"""Tensor names one FetchShard may list (a request is also capped at gRPC's 4 MiB)."""
MAX_PATTERNS = 64
MAX_PATTERN_BYTES = 256
MAX_JOB_ID_BYTES = 128
MAX_POLICY_BYTES = 128
MAX_PREFETCH_RANKS = 1024
"""Ranks one Prefetch may warm; each is a plan computed on the server."""


def check_text(what: str, value: str, limit: int) -> str:
    """`value`, unless its UTF-8 encoding is longer than `limit` bytes.

    Raises:
        InvalidRequestError: names the field, its length and the limit (never the value).
    """
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise InvalidRequestError(f"{what} is {size} bytes; the limit is {limit}")
    return value


UNPRINTABLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
"""Control, format and surrogate characters and line or paragraph separators: no model
directory or remote name needs one, and in a log line they could end the line or hide
what follows."""


def check_printable(what: str, value: str) -> str:
    """`value`, unless it holds a character of UNPRINTABLE_CATEGORIES.

    Raises:
        InvalidRequestError: names the field, the character's code point and its position
            (never the value, which could carry a forged log line).
    """
    for index, char in enumerate(value):
        if unicodedata.category(char) in UNPRINTABLE_CATEGORIES:
            raise InvalidRequestError(
                f"{what} has the unprintable character U+{ord(char):04X} at position {index}; names are printable text"
            )
    return value


def check_model_name(name: str) -> str:
    """A model name within the length and depth limits (a part within what a file system
    holds), of printable characters only: checked before the token's globs and for remote
    names too, which the disk cache stores as paths."""
    check_text("model name", name, MAX_MODEL_NAME_BYTES)
    check_printable("model name", name)
    check_parts(name)
    if name.count("/") >= MAX_MODEL_NAME_PARTS:
        raise InvalidRequestError(
            f"model name has {name.count('/') + 1} path parts; the limit is {MAX_MODEL_NAME_PARTS}"
        )
    return name


def check_names(names: Sequence[str]) -> list[str]:
    """FetchShard's tensor names, each and all within their limits."""
    if len(names) > MAX_NAMES:
        raise InvalidRequestError(f"{len(names)} tensor names; the limit is {MAX_NAMES}")
    return [check_text("tensor name", name, MAX_TENSOR_NAME_BYTES) for name in names]


def check_patterns(patterns: Sequence[str]) -> list[str]:
    """FetchFiles' glob patterns, each and all within their limits."""
    if len(patterns) > MAX_PATTERNS:
        raise InvalidRequestError(f"{len(patterns)} file patterns; the limit is {MAX_PATTERNS}")
    return [check_text("file pattern", pattern, MAX_PATTERN_BYTES) for pattern in patterns]


def check_prefetch_ranks(ranks: Sequence[int], world_size: int) -> list[int]:
    """Distinct ranks, each below world_size, at most MAX_PREFETCH_RANKS of them (all when empty)."""
    chosen = sorted(set(ranks)) if ranks else list(range(min(world_size, MAX_PREFETCH_RANKS + 1)))
    if len(chosen) > MAX_PREFETCH_RANKS:
        raise InvalidRequestError(
            f"prefetch of {len(chosen)} ranks; the limit is {MAX_PREFETCH_RANKS} per request (name the ranks)"
        )
    bad = [rank for rank in chosen if not 0 <= rank < world_size]
    if bad:
        raise InvalidRequestError(f"prefetch rank {bad[0]} must satisfy 0 <= rank < world_size {world_size}")
    return chosen
