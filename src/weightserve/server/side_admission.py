"""Who may hold connections to the shared-memory side socket before sending a ticket.

Connecting costs nothing and needs no token, and each connection is a descriptor in the
server until its ticket comes (or REDEEM_SECONDS pass). Uncapped, one local process
could hold enough of them to use up the server's open-files limit, after which nothing
could be accepted or built. So they are counted by the peer's process (SO_PEERCRED) and
in all, and the one over either cap is refused at once. A leased connection (its ticket
redeemed) no longer counts: it holds segments a token-checked call was granted.
"""

from __future__ import annotations

import collections
import logging
import resource
import socket
import struct
import time

logger = logging.getLogger(__name__)

MAX_WAITING_PER_PEER = 16
"""Connections one process may hold before sending its ticket; a client redeems one per fetch in flight."""
MAX_WAITING = 256
"""Connections without a ticket yet, from all processes (and at most a quarter of the open-files limit)."""
LOG_EVERY = 10.0
"""Seconds between two warnings of one kind (accept failures, refused connections)."""
PEERCRED = struct.Struct("3i")
"""struct ucred: pid, uid, gid."""


class Waiting:
    """Connections that have not sent their ticket yet, by the peer's process id."""

    def __init__(self, limit: int | None = None) -> None:
        self.by_pid: collections.Counter[int] = collections.Counter()
        self.limit = waiting_limit() if limit is None else limit
        self.refused = 0

    def enter(self, pid: int) -> str:
        """Count a new connection of `pid`; or, over a cap, count nothing and say why it is refused."""
        if self.by_pid[pid] >= MAX_WAITING_PER_PEER:
            reason = f"process {pid} holds {self.by_pid[pid]} connections without a ticket"
            reason += f" (at most {MAX_WAITING_PER_PEER})"
        elif self.by_pid.total() >= self.limit:
            reason = f"{self.by_pid.total()} connections without a ticket (at most {self.limit})"
        else:
            self.by_pid[pid] += 1
            return ""
        self.refused += 1
        return reason

    def leave(self, pid: int) -> None:
        """The connection sent its ticket, or went: it no longer counts."""
        self.by_pid[pid] -= 1
        if self.by_pid[pid] <= 0:
            del self.by_pid[pid]


def waiting_limit() -> int:
    """MAX_WAITING, or a quarter of the open-files limit when that is lower (descriptors for the rest)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return MAX_WAITING if soft == resource.RLIM_INFINITY else max(1, min(MAX_WAITING, soft // 4))


def peer_pid(conn: socket.socket) -> int:
    """The connecting process's id (0 where the kernel does not say)."""
    try:
        pid, _, _ = PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size))
    except OSError:
        return 0
    return int(pid)


class Throttled:
    """A recurring warning logged at most once per LOG_EVERY seconds, saying how many were held back.

    A flood of connections or a descriptor shortage fails hundreds of times a second; one
    line per failure would bury the log (and cost the loop more than the failure).
    """

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self._next = 0.0
        self._held = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return
        held, self._held, self._next = self._held, 0, now + LOG_EVERY
        self.log.warning("%s%s", message % args, f" (and {held} more like it)" if held else "")
