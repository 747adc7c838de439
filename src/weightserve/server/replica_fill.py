"""Replica fill: one replica copies a model another published in its disk cache (docs/wire.md).

`ReplicaFillServicer.FillReplica` streams the files of a published disk-cache entry
(never a `.partial` download) as FileChunks with crc32c, from a (path, offset) on.
`fill_from_peer` is its client: it writes each file into the caller's download directory,
verifies every chunk and every whole file against the file list each stream starts with
(fill_receiver.py), and resumes a broken stream from the last verified byte. The call
needs a token with the `replica` scope on a server with tokens.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path

import grpc

from weightserve import wire
from weightserve.config import ServerConfig
from weightserve.errors import InvalidRequestError, ModelNotFoundError, PreconditionError, UnavailableError
from weightserve.recording import NULL_RECORDER, Recorder
from weightserve.server.file_stream import FilePiece
from weightserve.server.fill_receiver import FillReceiver
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
        messages = _messages(files_dir, names, request.path, request.offset, self.chunk_bytes)
        async for message in _in_thread(messages):
            await context.write(message)
            self.recorder.replica_fill_sent(len(message.data))


def _messages(files_dir: Path, names: Sequence[str], start: str, offset: int, chunk: int) -> Iterator[pb.FileChunk]:
    """The stream's FileChunks; the first lists every file of the entry, so the filler knows when it has all."""
    listing = pb.FillEntry(files=[pb.FillEntryFile(path=n, size=(files_dir / n).stat().st_size) for n in names])
    for i, piece in enumerate(_pieces(files_dir, names, start, offset, chunk)):
        message = file_chunk(piece)
        if i == 0:
            message.entry.CopyFrom(listing)
        yield message


async def _in_thread(messages: Iterator[pb.FileChunk]) -> AsyncIterator[pb.FileChunk]:
    while (message := await asyncio.to_thread(next, messages, None)) is not None:
        yield message


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
    by the channel's keepalive). A stream that ends with status OK must have brought
    every file its first message listed (fill_receiver.py); one that did not is not
    resumed: the peer misbehaves, and the fleet asks another peer or the origin.

    Raises:
        UnavailableError: the replica has no such copy, refuses the call, sends no file
            list (it predates it), ends its stream early, sends bad bytes, or breaks
            PEER_ATTEMPTS times.
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
    receiver = FillReceiver(directory, f"replica fill of {key} from {address}")
    try:
        stub = pb_grpc.ReplicaServiceStub(channel)
        for attempt in range(1, PEER_ATTEMPTS + 1):
            path, offset = receiver.resume_from()
            request = pb.FillReplicaRequest(key=key, path=path, offset=offset, token=token)
            stream = stub.FillReplica(request, metadata=metadata)
            receiver.start_stream()
            try:
                for chunk in stream:
                    receiver.accept(chunk)
                receiver.finish()
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
