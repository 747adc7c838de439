"""The side Unix socket that hands shared-memory segments to clients on the same host.

gRPC cannot carry file descriptors, so FetchShardSegments returns a one-time ticket
and the client redeems it here: it connects (SOCK_SEQPACKET, so messages keep their
boundaries), sends `WSFD1` and the ticket, and receives the segments' descriptors with
SCM_RIGHTS, at most 250 to a message. The connection is then the client's lease: the
segments stay counted and kept until it closes, so a client that exits, however it
exits, releases them. A ticket is good once, for TICKET_SECONDS, for the segments it was
issued with (the caller's token was checked when it was issued).

Messages (docs/wire.md, "Shared memory"):
    client -> server   b"WSFD1" + ticket (32 bytes)
    server -> client   b"OK" + uint32 count + uint32 total (big-endian), `count` descriptors attached
    server -> client   b"ER" + UTF-8 reason, then the server closes
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MAGIC = b"WSFD1"
TICKET_BYTES = 32
TICKET_SECONDS = 30.0
MAX_FDS_PER_MESSAGE = 250
"""Below the kernel's SCM_MAX_FD (253)."""
REDEEM_SECONDS = 5.0
"""How long a connection may take to send its ticket."""
BATCH_HEADER = struct.Struct("!2sII")


@dataclass
class Grant:
    """Segments promised to one ticket: their descriptors and what to call when the lease ends."""

    fds: list[int]
    release: Callable[[], None]
    caller: str
    expires: float
    timer: asyncio.TimerHandle | None = None


class Handoff:
    """Issues tickets for segments and hands their descriptors out on a Unix socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pending: dict[bytes, Grant] = {}
        self.leases: set[asyncio.Task[None]] = set()
        self.redeemed = 0
        self.expired = 0
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen on the socket path (a stale socket file from a dead server is replaced)."""
        with contextlib.suppress(FileNotFoundError):
            if self.path.is_socket():
                self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.setblocking(False)
        listener.bind(str(self.path))
        listener.listen(128)
        self._listener = listener
        self._accepting = asyncio.ensure_future(self._accept())

    async def stop(self) -> None:
        """Stop accepting, end every lease (clients keep their mappings) and drop unredeemed tickets."""
        if self._accepting is not None:
            self._accepting.cancel()
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        for task in list(self.leases):
            task.cancel()
        await asyncio.gather(*self.leases, return_exceptions=True)
        for ticket in list(self.pending):
            self._expire(ticket)

    def issue(self, fds: Sequence[int], release: Callable[[], None], caller: str) -> bytes:
        """A one-time ticket for `fds` (owned by the segments: never closed here); `release` ends the lease."""
        ticket = secrets.token_bytes(TICKET_BYTES)
        grant = Grant(list(fds), release, caller, time.monotonic() + TICKET_SECONDS)
        grant.timer = asyncio.get_running_loop().call_later(TICKET_SECONDS, self._expire, ticket)
        self.pending[ticket] = grant
        return ticket

    def _expire(self, ticket: bytes) -> None:
        grant = self.pending.pop(ticket, None)
        if grant is not None:
            self.expired += 1
            if grant.timer is not None:
                grant.timer.cancel()
            grant.release()

    async def _accept(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            conn.setblocking(False)
            task = asyncio.ensure_future(self._serve(conn))
            self.leases.add(task)
            task.add_done_callback(self.leases.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        grant: Grant | None = None
        try:
            try:
                request = await asyncio.wait_for(loop.sock_recv(conn, 64), REDEEM_SECONDS)
            except (TimeoutError, asyncio.TimeoutError):
                await _send(conn, b"ER" + b"no ticket within 5 s")
                return
            ticket = request[len(MAGIC) :] if request.startswith(MAGIC) else b""
            grant = self.pending.pop(ticket, None)
            if grant is None:
                await _send(conn, b"ER" + b"unknown, used or expired ticket: call FetchShardSegments again")
                return
            if grant.timer is not None:
                grant.timer.cancel()
            total = len(grant.fds)
            for start in range(0, max(total, 1), MAX_FDS_PER_MESSAGE):
                batch = grant.fds[start : start + MAX_FDS_PER_MESSAGE]
                await _send(conn, BATCH_HEADER.pack(b"OK", len(batch), total), batch)
            self.redeemed += 1
            while await loop.sock_recv(conn, 64):  # the lease: held until the client closes
                pass
        except (ConnectionError, OSError) as e:
            logger.debug("shared-memory lease of %s ended: %s", grant.caller if grant else "a client", e)
        finally:
            conn.close()
            if grant is not None:
                grant.release()


async def _send(conn: socket.socket, payload: bytes, fds: Sequence[int] = ()) -> None:
    """Send one message (with descriptors), waiting while the socket's buffer is full."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            if fds:
                socket.send_fds(conn, [payload], list(fds))
            else:
                conn.send(payload)
            return
        except BlockingIOError:
            writable = loop.create_future()
            loop.add_writer(conn.fileno(), writable.set_result, None)
            try:
                await writable
            finally:
                loop.remove_writer(conn.fileno())


def socket_path(listen: str) -> Path | None:
    """The file of a `unix:PATH` address; None over TCP (and for abstract sockets, which have none)."""
    if not listen.startswith("unix:") or listen.startswith("unix-abstract:"):
        return None
    return Path(os.path.abspath(listen.removeprefix("unix:").removeprefix("//")))


def handoff_path(listen: str) -> Path | None:
    """The side socket of a server listening on `unix:PATH`: PATH + ".fds"; None over TCP."""
    path = socket_path(listen)
    return None if path is None else path.with_name(path.name + ".fds")
