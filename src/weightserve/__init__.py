"""weightserve: per-rank checkpoint shards over gRPC, checksummed and resumable.

Importing this package has no side effects.
"""

from weightserve._version import __version__
from weightserve.client import AsyncWeightClient, WeightClient
from weightserve.errors import (
    CorruptCheckpointError,
    FetchError,
    IntegrityError,
    InvalidRequestError,
    ModelNotFoundError,
    PreconditionError,
    WeightserveError,
)

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
