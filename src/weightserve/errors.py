"""The exception taxonomy.

Every class roots at WeightserveError and also subclasses the builtin a caller would
expect, so `except LookupError` and `except ModelNotFoundError` both work. The server
maps these to gRPC status codes in one table (server/status.py); the client raises
FetchError carrying the status it received. Stdlib only.
"""

from __future__ import annotations


class WeightserveError(Exception):
    """Base of every error weightserve raises on purpose."""


class ModelNotFoundError(WeightserveError, LookupError):
    """The model name is not under any model root (or escapes its root)."""


class TensorNotFoundError(WeightserveError, LookupError):
    """A requested tensor name is not in the plan."""


class InvalidRequestError(WeightserveError, ValueError):
    """The request cannot be served as asked (bad rank, impossible split, ...)."""


class UnknownNameError(InvalidRequestError, LookupError):
    """No implementation is registered under a name (a loader, an EPLB policy, a storage scheme)."""


UnknownFormatError = UnknownNameError
"""The name this error had when only loaders were registered."""


class JobNotFoundError(WeightserveError, LookupError):
    """No control job has the given id (it never existed, or it finished and expired)."""


class UploadNotFoundError(WeightserveError, LookupError):
    """No upload of a version has that id (never started here, or committed long ago)."""


class PreconditionError(WeightserveError, RuntimeError):
    """The request does not match the server's state (changed revision, stale manifest)."""


class UnsafeCheckpointError(WeightserveError, RuntimeError):
    """A pickle checkpoint tried to load something other than plain tensors."""


class CorruptCheckpointError(WeightserveError, ValueError):
    """A checkpoint file is malformed, truncated or changed while being read."""


class PermissionDeniedError(WeightserveError, PermissionError):
    """The caller may not have this (a remote source outside the allow-list, a model or an
    action outside the caller's token)."""


class UnauthenticatedError(WeightserveError, PermissionError):
    """The call carries no token, or one the server does not know."""


class ResourceExhaustedError(WeightserveError, MemoryError):
    """Serving the request would exceed a configured budget or a concurrency limit.

    `retry_after` (seconds) is how long a client should wait before trying again; the
    server sends it as `retry-after-ms` trailing metadata. None: retrying will not help.
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StreamStalledError(WeightserveError, TimeoutError):
    """A stream made no progress (its client read nothing) for the configured idle time."""


class UnavailableError(WeightserveError, ConnectionError):
    """The server is draining or cannot be reached."""


class IntegrityError(WeightserveError, ValueError):
    """Received bytes do not match their checksum."""


class FetchError(WeightserveError, RuntimeError):
    """A client call failed; `code()` is the grpc.StatusCode the server answered."""

    def __init__(self, message: str, code: object) -> None:
        super().__init__(message)
        self._code = code

    def code(self) -> object:
        """The grpc.StatusCode of the failure (typed loosely: errors.py is stdlib only)."""
        return self._code

    def details(self) -> str:
        """The human-readable message, as grpc.RpcError.details() gives it."""
        return str(self)


class RedeemError(FetchError):
    """The side socket did not hand over a shared-memory grant's descriptors.

    The grant itself was fine, so the same fetch can still stream chunks: with
    transport="auto" the client does, and raises this only for transport="shm".
    """
