"""Models in S3 or an S3-compatible store: `s3://bucket/prefix[@revision]`.

Credentials, region and endpoint come from boto3's usual sources (AWS_ACCESS_KEY_ID,
AWS_PROFILE, AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, ...). The prefix is listed one
level deep (sub-folders are never served), its files are picked as the loaders pick
them (an index json names the weight files), and they are downloaded with parallel
ranged GETs into the disk cache. The revision is a hash of the served files' ETags,
so a replaced object is a new revision and a new cache entry. Every GET carries the
listed ETag (If-Match), so an object replaced mid-download fails the download instead
of mixing two versions.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

from weightserve.errors import (
    CorruptCheckpointError,
    ModelNotFoundError,
    PermissionDeniedError,
    UnavailableError,
)
from weightserve.storage import register_storage
from weightserve.storage.base import ModelLocation, RemoteName, Storage
from weightserve.storage.disk_cache import DiskCache, default_cache_dir
from weightserve.storage.ranged import MiB, RangeJob, RemoteFile, download_files, with_retries
from weightserve.storage.selection import metadata_names, weight_names

if TYPE_CHECKING:
    from weightserve.config import ServerConfig

logger = logging.getLogger(__name__)

ATTEMPTS = 5
"""Tries per S3 request (listing page, index read, ranged GET), with jittered exponential backoff."""

_NOT_FOUND = {"NoSuchBucket", "NoSuchKey", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


def make_client(threads: int = 8) -> Any:
    """A thread-safe boto3 S3 client that makes each request once.

    Retries are ours alone (`with_retries`, ATTEMPTS per request): botocore's own retries
    stacked under ours would make 5 x 5 = 25 attempts of a failing range, and would not
    cover a body cut short mid-read, which ours do.

    Raises:
        ModuleNotFoundError: boto3 is not installed.
    """
    try:
        import boto3
        from botocore.config import Config
    except ImportError as e:
        raise ModuleNotFoundError("s3:// sources need boto3: pip install 'weightserve[s3]'") from e
    config = Config(
        retries={"total_max_attempts": 1, "mode": "standard"},
        max_pool_connections=threads + 2,
        connect_timeout=10,
        read_timeout=60,
    )
    return boto3.session.Session().client("s3", config=config)


def etag_revision(files: list[RemoteFile]) -> str:
    """A revision pinning the served files: a hash of their names, ETags and sizes."""
    digest = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.name):
        digest.update(f"{f.name}\0{f.etag}\0{f.size}\n".encode())
    return "s3-" + digest.hexdigest()[:20]


def retryable(exc: BaseException) -> bool:
    """Whether a failed ranged GET is worth another try (network trouble, 5xx, throttling)."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, IncompleteReadError

    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return bool(status >= 500 or status == 429 or exc.response.get("Error", {}).get("Code") == "SlowDown")
    return isinstance(exc, (ConnectionError, HTTPClientError, IncompleteReadError, OSError))


class S3Storage(Storage):
    """Resolves `s3://bucket/prefix` to a complete local copy in the disk cache."""

    scheme = "s3"

    def __init__(
        self,
        cache: DiskCache,
        client: Any = None,
        *,
        part_bytes: int = 8 * MiB,
        threads: int = 8,
        attempts: int = ATTEMPTS,
        backoff: float = 0.2,
        refresh_seconds: float = 30.0,
    ) -> None:
        self.cache = cache
        self.client = client if client is not None else make_client(threads)
        self.part_bytes = part_bytes
        self.threads = threads
        self.attempts = attempts
        self.backoff = backoff
        self.refresh_seconds = refresh_seconds
        self._memo: dict[str, tuple[float, str, ModelLocation]] = {}
        self._indexes: dict[tuple[str, str, str], str] = {}
        self._lock = threading.Lock()

    def resolve(self, remote: RemoteName) -> ModelLocation:
        """List the prefix, pick the files, download them once; blocking.

        Raises:
            ModelNotFoundError: no such bucket, prefix or weights, or a pinned revision
                that is neither current nor in the disk cache (S3 keeps only the current objects).
            CorruptCheckpointError: the index json names an object that is not there.
            PermissionDeniedError: the server's credentials may not read the bucket.
            UnavailableError: S3 cannot be reached, or an object changed mid-download.
        """
        name = remote.unversioned + (f"@{remote.revision}" if remote.revision else "")
        with self._lock:
            memo = self._memo.get(name)
        if memo is not None and time.monotonic() < memo[0] and self.cache.lookup(memo[1]) is not None:
            return memo[2]
        bucket, _, prefix = remote.path.partition("/")
        if not bucket or not prefix:
            raise ModelNotFoundError(f"{remote.unversioned}: an S3 model is named s3://BUCKET/PREFIX")
        if remote.revision:  # a pinned revision still on disk is served even after S3 moved on
            pinned = self.cache.lookup(f"{remote.unversioned}@{remote.revision}")
            if pinned is not None:
                return ModelLocation("s3", name, pinned, remote.revision)
        with _s3_errors(remote.unversioned):
            files = self._select(bucket, prefix, remote.unversioned)
            revision = etag_revision(files)
            if remote.revision and remote.revision != revision:
                raise ModelNotFoundError(
                    f"{remote.unversioned} is at revision {revision}, not {remote.revision}; "
                    "S3 serves only the current objects"
                )
            key = f"{remote.unversioned}@{revision}"
            model_dir = self.cache.lookup(key)
            if model_dir is None:
                fetch = partial(
                    download_files,
                    files,
                    read=partial(self._read_range, bucket),
                    retryable=retryable,
                    part_bytes=self.part_bytes,
                    threads=self.threads,
                    attempts=self.attempts,
                    backoff=self.backoff,
                    label=remote.path,
                )
                model_dir = self.cache.populate(key, sum(f.size for f in files), fetch)
        location = ModelLocation("s3", name, model_dir, revision)
        with self._lock:
            self._memo[name] = (time.monotonic() + self.refresh_seconds, key, location)
        return location

    def _select(self, bucket: str, prefix: str, label: str) -> list[RemoteFile]:
        listing = with_retries(partial(self._list, bucket, prefix), retryable, self.attempts, self.backoff)
        if not listing:
            raise ModelNotFoundError(f"{label}: no objects under s3://{bucket}/{prefix}/")
        chosen = set(metadata_names(listing))
        weights = weight_names(listing, lambda n: self._index_text(bucket, listing[n]), label)
        missing = [w for w in weights if w not in listing]
        if missing:
            raise CorruptCheckpointError(f"{label}: the index names {missing[:5]}, which are not in the bucket")
        return [listing[n] for n in sorted(chosen | set(weights))]

    def _list(self, bucket: str, prefix: str) -> dict[str, RemoteFile]:
        found = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/", Delimiter="/")
        for page in pages:
            for obj in page.get("Contents", []):
                name = obj["Key"][len(prefix) + 1 :]
                if name and not name.startswith("."):
                    found[name] = RemoteFile(name, obj["Key"], int(obj["Size"]), obj["ETag"])
        return found

    def _index_text(self, bucket: str, file: RemoteFile) -> str:
        cached = self._indexes.get((bucket, file.key, file.etag))
        if cached is None:
            read = partial(self._read_range, bucket, RangeJob(file, 0, file.size))
            cached = with_retries(read, retryable, self.attempts, self.backoff).decode()
            self._indexes[(bucket, file.key, file.etag)] = cached
        return cached

    def _read_range(self, bucket: str, job: RangeJob) -> bytes:
        if job.end <= job.start:
            return b""
        response = self.client.get_object(
            Bucket=bucket, Key=job.file.key, Range=f"bytes={job.start}-{job.end - 1}", IfMatch=job.file.etag
        )
        with closing(response["Body"]) as body:
            data: bytes = body.read()
        return data


@contextmanager
def _s3_errors(label: str) -> Iterator[None]:
    """botocore's exceptions as weightserve's, with what to do about each."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        yield
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in _NOT_FOUND:
            raise ModelNotFoundError(f"{label}: {code} ({e})") from e
        if code in _DENIED:
            raise PermissionDeniedError(f"{label}: the server's AWS credentials may not read it ({code})") from e
        if code in ("PreconditionFailed", "412"):
            raise UnavailableError(f"{label}: an object changed while it was downloaded; retry") from e
        raise UnavailableError(f"{label}: S3 error {code}: {e}") from e
    except NoCredentialsError as e:
        raise UnavailableError(f"{label}: the server has no AWS credentials (set AWS_ACCESS_KEY_ID, ...)") from e
    except (BotoCoreError, ConnectionError) as e:
        raise UnavailableError(f"{label}: S3 could not be reached ({e})") from e


@register_storage("s3")
def _from_config(config: ServerConfig) -> S3Storage:
    root = (config.disk_cache_dir or default_cache_dir()) / "s3"
    return S3Storage(DiskCache(root, config.disk_cache_bytes))
