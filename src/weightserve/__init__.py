"""weightserve: per-rank checkpoint shards over gRPC, checksummed and resumable.

Importing this package has no side effects and loads nothing heavy: the clients
(grpc, torch) load on first use of `weightserve.WeightClient`, so `weightserve.eplb`
or `weightserve.errors` can be imported alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from weightserve._version import __version__
from weightserve.errors import (
    CorruptCheckpointError,
    FetchError,
    IntegrityError,
    InvalidRequestError,
    ModelNotFoundError,
    PreconditionError,
    WeightserveError,
)

if TYPE_CHECKING:
    from weightserve.client import AsyncWeightClient, WeightClient

_CLIENTS = ("AsyncWeightClient", "WeightClient")


def __getattr__(name: str) -> Any:
    if name in _CLIENTS:
        from weightserve import client

        return getattr(client, name)
    raise AttributeError(f"module 'weightserve' has no attribute {name!r}")


__all__ = [
    "AsyncWeightClient",
    "CorruptCheckpointError",
    "FetchError",
    "IntegrityError",
    "InvalidRequestError",
    "ModelNotFoundError",
    "PreconditionError",
    "WeightClient",
    "WeightserveError",
    "__version__",
]
