"""Replica fill: one replica copies a model another published in its disk cache (docs/wire.md).

`ReplicaFillServicer.FillReplica` streams the files of a published disk-cache entry
(never a `.partial` download) as FileChunks with crc32c, from a (path, offset) on.
`fill_from_peer` is its client: it writes each file into the caller's download directory,
verifies every chunk and every whole file, and resumes a broken stream from the last
verified byte. The call needs a token with the `replica` scope on a server with tokens.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import BinaryIO

import grpc

from weightserve import wire
from weightserve.config import ServerConfig
from weightserve.errors import InvalidRequestError, ModelNotFoundError, PreconditionError, UnavailableError
from weightserve.recording import NULL_RECORDER, Recorder
from weightserve.server.file_stream import FilePiece
from weightserve.server.proto_convert import file_chunk
from weightserve.server.status_codes import call_errors
from weightserve.storage.base import Storage
from weightserve.storage.coordination import Holder, RedisCoordinator
from weightserve.storage.disk_cache import DiskCache
from weightserve.storage.fleet_fill import FleetFill
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

FILL_CHUNK_BYTES = 1 << 20
PEER_ATTEMPTS = 5
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
"""Peer failures worth resuming; NOT_FOUND (no copy) and PERMISSION_DENIED (no replica scope) are not."""


def _pieces(files_dir: Path, names: Sequence[str], start: str, offset: int, chunk: int) -> Iterator[FilePiece]:
    """Chunks of `names` from (start, offset); each file's crc covers the whole file, prefix included."""
    if start and start not in names:
        raise InvalidRequestError(f"resume path {start!r} is not a file of this entry")
    for name in names[names.index(start) if start else 0 :]:
        skip = offset if name == start else 0
        with (files_dir / name).open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if skip > size:
                raise InvalidRequestError(f"resume offset {skip} is past the end of {name} ({size} bytes)")
            if name == start and skip == size:
                continue  # resumed at the end of a finished file: the next file
            running, position = 0, 0
            while position < skip:  # the whole-file crc needs the prefix the caller already has
                data = f.read(min(chunk, skip - position))
                running = wire.crc32c(data, running)
                position += len(data)
            while True:
                data = f.read(min(chunk, size - position))
                crc = wire.crc32c(data)
                running = wire.crc32c_combine(running, crc, len(data))
                last = position + len(data) >= size
                yield FilePiece(name, position, size, crc, last, running if last else 0, data)
                position += len(data)
                if last:
                    break


class ReplicaFillServicer(pb_grpc.ReplicaServiceServicer):
    """Serves the published entries of this replica's disk caches (the remote back ends')."""

    def __init__(
        self, caches: Sequence[DiskCache], chunk_bytes: int = FILL_CHUNK_BYTES, recorder: Recorder = NULL_RECORDER
    ) -> None:
        self.caches = list(caches)
        self.chunk_bytes = chunk_bytes
        self.recorder = recorder

    def _entry(self, key: str, token: int) -> tuple[Path, list[str]]:
        for cache in self.caches:
            found = cache.published_files(key)
            if found is None:
                continue
            files_dir, names, held = found
            if token and held != token:
                raise PreconditionError(f"this replica's copy of {key} is token {held}, not {token}")
            return files_dir, names
        raise ModelNotFoundError(f"{key} is not published in this replica's disk cache")

    @call_errors
    async def FillReplica(self, request: pb.FillReplicaRequest, context: grpc.aio.ServicerContext) -> None:
        files_dir, names = self._entry(request.key, request.token)
        pieces = _pieces(files_dir, names, request.path, request.offset, self.chunk_bytes)
        async for piece in _in_thread(pieces):
            await context.write(file_chunk(piece))
            self.recorder.replica_fill_sent(len(piece.data))


async def _in_thread(pieces: Iterator[FilePiece]) -> AsyncIterator[FilePiece]:
    while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
        yield piece


class _Receiver:
    """Writes verified chunks into `directory`, file by file; knows where to resume."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = ""
        self.offset = 0
        self.last_done: tuple[str, int] | None = None
        self._file: BinaryIO | None = None
        self._running = 0

    def accept(self, chunk: pb.FileChunk) -> None:
        if chunk.path != self.path or chunk.offset != self.offset:
            if chunk.offset != 0:
                raise UnavailableError(
                    f"replica fill sent {chunk.path}@{chunk.offset}, expected {self.path}@{self.offset}"
                )
            self._open(chunk.path)
        if wire.crc32c(chunk.data) != chunk.crc32c:
            raise UnavailableError(f"replica fill: checksum mismatch in {chunk.path} at {chunk.offset}")
        assert self._file is not None
        self._file.write(chunk.data)
        self._running = wire.crc32c_combine(self._running, chunk.crc32c, len(chunk.data))
        self.offset += len(chunk.data)
        if chunk.last:
            if self._running != chunk.file_crc32c or self.offset != chunk.size:
                raise UnavailableError(f"replica fill: {chunk.path} does not match its whole-file checksum")
            self.close()
            final = self.directory / chunk.path
            os.replace(final.with_name(final.name + ".fill"), final)
            self.last_done, self.path, self.offset = (chunk.path, chunk.size), "", 0

    def _open(self, name: str) -> None:
        self.close()
        root = self.directory.resolve()
        target = (root / name).resolve()
        if os.path.commonpath([target, root]) != str(root):
            raise UnavailableError(f"replica fill sent a path outside the model: {name!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        self._file = target.with_name(target.name + ".fill").open("wb")
        self.path, self.offset, self._running = name, 0, 0

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def resume_from(self) -> tuple[str, int]:
        """Where to ask next: within the unfinished file, or at the end of the last finished one (the next file)."""
        if self.path:
            return self.path, self.offset
        return self.last_done or ("", 0)


def fill_from_peer(
    copy: Holder | str,
    key: str,
    directory: Path,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    metadata: tuple[tuple[str, str], ...] = (),
    server_name: str | None = None,
) -> None:
    """Copy the published files of `key` from a replica into `directory`.

    `copy` is the `ready` record (the replica's address and the token its copy must
    carry), or an address alone (any published copy).

    A broken stream is resumed from the last verified byte (a stalled peer is noticed
    by the channel's keepalive).

    Raises:
        UnavailableError: the replica has no such copy, refuses the call, or breaks or
            sends bad bytes PEER_ATTEMPTS times.
    """
    address, token = (copy.address, copy.token) if isinstance(copy, Holder) else (copy, 0)
    options: list[tuple[str, str | int]] = [
        ("grpc.max_receive_message_length", 8 << 20),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    channel = (
        grpc.secure_channel(address, credentials, options=options)
        if credentials is not None
        else grpc.insecure_channel(address, options=options)
    )
    receiver = _Receiver(directory)
    try:
        stub = pb_grpc.ReplicaServiceStub(channel)
        for attempt in range(1, PEER_ATTEMPTS + 1):
            path, offset = receiver.resume_from()
            request = pb.FillReplicaRequest(key=key, path=path, offset=offset, token=token)
            stream = stub.FillReplica(request, metadata=metadata)
            try:
                for chunk in stream:
                    receiver.accept(chunk)
                return
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE:
                    raise UnavailableError(f"replica fill of {key} from {address}: {e.details()}") from None
                logger.warning("replica fill of %s from %s broke (%s); resuming", key, address, e.code().name)
                time.sleep(min(0.1 * 2**attempt, 2.0))
            finally:
                stream.cancel()
        raise UnavailableError(f"replica fill of {key} from {address} broke {PEER_ATTEMPTS} times")
    finally:
        receiver.close()
        channel.close()


REPLICA_TOKEN_ENV = "WEIGHTSERVE_REPLICA_TOKEN"
"""A token with the `replica` scope that this replica shows the others' FillReplica."""
REPLICA_SERVER_NAME_ENV = "WEIGHTSERVE_REPLICA_SERVER_NAME"
"""Under TLS, the name the other replicas' certificates carry (the headless Service); default: their address."""
CA_ENV = "WEIGHTSERVE_TLS_CA"


def disk_caches(remotes: Mapping[str, Storage]) -> list[DiskCache]:
    """The disk caches of the remote back ends that keep one (S3; the Hub under --coordination)."""
    return [cache for backend in remotes.values() if isinstance(cache := getattr(backend, "cache", None), DiskCache)]


def coordinate(
    config: ServerConfig,
    caches: Sequence[DiskCache],
    env: Mapping[str, str] | None = None,
    recorder: Recorder = NULL_RECORDER,
) -> FleetFill | None:
    """Under --coordination, make `caches` fill through the fleet; None without it.

    The peer channel speaks TLS when this server does, showing its own certificate (the
    mTLS replica identity) and trusting $WEIGHTSERVE_TLS_CA; it carries
    $WEIGHTSERVE_REPLICA_TOKEN when set.
    """
    if not config.coordination:
        return None
    env = os.environ if env is None else env
    coordinator = RedisCoordinator(config.coordination, config.advertise or config.listen, config.lease_seconds)
    token = env.get(REPLICA_TOKEN_ENV, "")
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    credentials = None
    if config.tls_cert is not None and config.tls_key is not None:
        ca = env.get(CA_ENV)
        credentials = grpc.ssl_channel_credentials(
            Path(ca).read_bytes() if ca else None, config.tls_key.read_bytes(), config.tls_cert.read_bytes()
        )
    peer = partial(
        fill_from_peer,
        credentials=credentials,
        metadata=metadata,
        server_name=env.get(REPLICA_SERVER_NAME_ENV) or None,
    )
    fleet = FleetFill(coordinator, peer, recorder=recorder)
    for cache in caches:
        cache.fleet = fleet
    logger.info("coordinating remote downloads through %s as %s", config.coordination, coordinator.address)
    return fleet
