"""The side Unix socket that hands shared-memory segments to clients on the same host.

gRPC cannot carry file descriptors, so FetchShardSegments returns a one-time ticket
and the client redeems it here: it connects (SOCK_SEQPACKET, so messages keep their
boundaries), sends `WSFD1` and the ticket, and receives the segments' descriptors with
SCM_RIGHTS, at most 250 to a message. The connection is then the client's lease: the
segments stay counted and kept until it closes, so a client that exits, however it
exits, releases them. A ticket is good once, for TICKET_SECONDS, for the segments it was
issued with (the caller's token was checked when it was issued).

Anyone who can connect can hold connections open without a ticket, so those are capped
per process (SO_PEERCRED) and in all, and refused at once beyond that: one local process
cannot use up the server's descriptors. The accept loop outlives any failure to accept
(out of descriptors or memory): it logs, pauses and goes on. Should it end anyway,
`accepting` turns False and FetchShardSegments refuses, so clients stream chunks rather
than wait on tickets nobody would redeem.

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
import stat
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from weightserve.server.side_admission import Throttled, Waiting, peer_pid

logger = logging.getLogger(__name__)

MAGIC = b"WSFD1"
TICKET_BYTES = 32
TICKET_SECONDS = 30.0
MAX_FDS_PER_MESSAGE = 250
"""Below the kernel's SCM_MAX_FD (253)."""
REDEEM_SECONDS = 5.0
"""How long a connection may take to send its ticket."""
BATCH_HEADER = struct.Struct("!2sII")
ACCEPT_PAUSE = 0.2
"""Seconds the accept loop waits after accept fails, for descriptors or memory to come free."""


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
        self.waiting = Waiting()
        self.redeemed = 0
        self.expired = 0
        self.accept_failures = 0
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._accept_log = Throttled(logger)
        self._refusal_log = Throttled(logger)

    @property
    def accepting(self) -> bool:
        """Whether the accept loop runs: a ticket issued while it does not could never be redeemed."""
        return self._accepting is not None and not self._accepting.done()

    async def start(self) -> None:
        """Listen on the socket path (a stale socket file from a dead server is replaced).

        Raises:
            OSError: one line naming the side socket when a file or directory is in its way
                (it starts with the flag, as the command line reports bind failures).
        """
        in_the_way = _not_a_socket(self.path)
        if in_the_way:
            grpc_socket = self.path.with_name(self.path.name.removesuffix(".fds"))
            raise OSError(
                f"--listen unix:{grpc_socket}: its shared-memory side socket {self.path} cannot be made: "
                f"{in_the_way} is in the way; remove it, or listen at another path"
            )
        with contextlib.suppress(FileNotFoundError):
            if self.path.is_socket():
                self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.setblocking(False)
        listener.bind(str(self.path))
        listener.listen(128)
        self._listener = listener
        self._accepting = asyncio.ensure_future(self._accept())
        self._accepting.add_done_callback(self._accept_ended)

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
        """Accept until cancelled; a failed accept (EMFILE, ENFILE, ENOBUFS, ENOMEM...) pauses, never ends it."""
        listener = self._listener
        assert listener is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as e:
                if listener.fileno() < 0:  # closed by stop()
                    return
                self.accept_failures += 1
                self._accept_log.warning(
                    "shared-memory side socket %s: cannot accept (%s); retrying every %.1f s",
                    self.path, e.strerror or e, ACCEPT_PAUSE,
                )  # fmt: skip
                await asyncio.sleep(ACCEPT_PAUSE)
                continue
            self._admit(conn)

    def _accept_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error(
                "shared-memory side socket %s stopped accepting; FetchShardSegments is refused until a restart "
                "(clients stream chunks)", self.path, exc_info=task.exception(),
            )  # fmt: skip

    def _admit(self, conn: socket.socket) -> None:
        """Serve a new connection, or refuse it at once when its process (or everyone) holds too many."""
        pid = peer_pid(conn)
        reason = self.waiting.enter(pid)
        if not reason:
            conn.setblocking(False)
            task = asyncio.ensure_future(self._serve(conn, pid))
            self.leases.add(task)
            task.add_done_callback(self.leases.discard)
            return
        self._refusal_log.warning("shared-memory side socket %s: refused a connection: %s", self.path, reason)
        with contextlib.suppress(OSError):  # a fresh connection's buffer is empty: this cannot block
            conn.setblocking(False)
            conn.send(b"ER" + f"busy: {reason}; send the ticket at once, or stream chunks".encode())
        conn.close()

    async def _ticket(self, conn: socket.socket, pid: int) -> bytes | None:
        """The ticket the connection sends within REDEEM_SECONDS (None: refused); it stops counting as waiting."""
        loop = asyncio.get_running_loop()
        try:
            request = await asyncio.wait_for(loop.sock_recv(conn, 64), REDEEM_SECONDS)
        except (TimeoutError, asyncio.TimeoutError):
            await _send(conn, b"ER" + b"no ticket within 5 s")
            return None
        finally:
            self.waiting.leave(pid)
        return request[len(MAGIC) :] if request.startswith(MAGIC) else b""

    async def _serve(self, conn: socket.socket, pid: int) -> None:
        loop = asyncio.get_running_loop()
        grant: Grant | None = None
        try:
            ticket = await self._ticket(conn, pid)
            if ticket is None:
                return
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


def _not_a_socket(path: Path) -> str:
    """What other than a socket is at `path` ('' for nothing or a socket), for the start-up error."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return ""
    if stat.S_ISSOCK(mode):
        return ""
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISREG, "a regular file"))
    return next((kind for test, kind in kinds if test(mode)), "a file that is not a socket")


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
