"""Which replica of a fleet serves which model: rendezvous hashing over resolved endpoints.

A fleet is a list of "host:port" addresses, or a `dns:///name:port` target (a Kubernetes
headless Service) that resolves to one address per replica and is resolved again every
`refresh_seconds`. Each model is ranked over the replicas by rendezvous
(highest-random-weight) hashing of its name: every client computes the same order
without talking to anyone, a model's bytes sit in the caches of its first few replicas
only, and adding a replica to N moves only the models the newcomer now wins, ~1/(N+1)
of them.

A hot model (hundreds of workers at once) is spread over its top `replicas_per_model`
replicas by hashing (model, rank, spread key) among them, where the spread key names the
worker's node by default: rank r of every node does not land on one replica, and one
worker always asks the same replica (its warm cache). Hashing was chosen over
bounded-load hashing because it needs no load figures shared between clients that never
talk to each other; the price is an uneven spread when few workers ask (binomial, not
exact), which `benchmarks/fleet.py` measures.

Nothing here does I/O but `Resolver.resolve` (getaddrinfo).
"""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from weightserve.addresses import dial_address, host_port
from weightserve.errors import InvalidRequestError

logger = logging.getLogger("weightserve.client")

DNS_PREFIX = "dns:///"


def score(key: str, endpoint: str) -> int:
    """The rendezvous weight of `endpoint` for `key`: 64 bits of blake2b over both, stable everywhere."""
    digest = hashlib.blake2b(f"{key}\x00{endpoint}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous(key: str, endpoints: Iterable[str]) -> list[str]:
    """`endpoints` ordered by rendezvous weight for `key`, highest first (ties by name).

    Example:
        >>> rendezvous("org/llama", ["10.0.0.5:50051", "10.0.0.6:50051"])[0] in {"10.0.0.5:50051", "10.0.0.6:50051"}
        True
    """
    return sorted(set(endpoints), key=lambda e: (-score(key, e), e))


def fetch_order(
    model: str, endpoints: Iterable[str], *, rank: int = 0, spread_key: str = "", replicas_per_model: int = 1
) -> list[str]:
    """The replicas a fetch tries, in order: one of the model's top `replicas_per_model`, then the rest.

    The first is picked among the model's top replicas by hashing (model, rank,
    spread_key); the others follow in the model's own rendezvous order, which is the
    failover order.

    Raises:
        ValueError: replicas_per_model < 1.
    """
    if replicas_per_model < 1:
        raise ValueError(f"replicas_per_model {replicas_per_model} must be >= 1")
    order = rendezvous(model, endpoints)
    if replicas_per_model == 1 or len(order) < 2:
        return order
    first = rendezvous(f"{model}\x00{rank}\x00{spread_key}", order[:replicas_per_model])[0]
    return [first, *(e for e in order if e != first)]


def is_fleet(address: str | Sequence[str]) -> bool:
    """Whether a WeightClient address names a fleet: a list, "a:1,b:2", or a dns:/// target."""
    if not isinstance(address, str):
        return True
    return "," in address or address.startswith(DNS_PREFIX)


@dataclass(frozen=True)
class Target:
    """A fleet address as the user gave it: fixed endpoints, or a DNS name and port to resolve."""

    endpoints: tuple[str, ...] = ()
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, address: str | Sequence[str]) -> Target:
        """From a list of "host:port", a comma-separated string of them, or "dns:///name:port".

        Raises:
            InvalidRequestError: no address, a dns:/// target without a host or port, or an
                endpoint that is not HOST:PORT with a port within 1-65535.
        """
        if isinstance(address, str) and address.startswith(DNS_PREFIX):
            try:
                host, port = host_port(address.removeprefix(DNS_PREFIX))
            except ValueError as e:
                raise InvalidRequestError(f"{address!r}: a dns:/// fleet {e} (dns:///name:50051)") from None
            if not host or not port:
                raise InvalidRequestError(f"{address!r}: a dns:/// fleet needs a host and port (dns:///name:50051)")
            return cls(host=host, port=port)
        parts = address.split(",") if isinstance(address, str) else list(address)
        endpoints = tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))
        if not endpoints:
            raise InvalidRequestError("a fleet needs at least one address")
        for endpoint in endpoints:
            try:
                dial_address(endpoint)
            except ValueError as e:
                raise InvalidRequestError(f"fleet address {endpoint!r} {e}") from None
        return cls(endpoints=endpoints)

    def __str__(self) -> str:
        return f"{DNS_PREFIX}{self.host}:{self.port}" if self.host else ",".join(self.endpoints)


def _getaddrinfo(host: str, port: int) -> list[str]:
    out = []
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        ip, port_ = str(sockaddr[0]), int(sockaddr[1])
        out.append(f"[{ip}]:{port_}" if family == socket.AF_INET6 else f"{ip}:{port_}")
    return out


class Resolver:
    """The fleet's endpoints now: fixed ones, or a DNS name resolved at most every `refresh_seconds`.

    A failed resolution keeps the last good answer (and says so once per failure run);
    the first one raises, since there is nothing to keep.
    """

    def __init__(
        self,
        target: Target,
        refresh_seconds: float = 30.0,
        lookup: Callable[[str, int], list[str]] = _getaddrinfo,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = target
        self.refresh_seconds = refresh_seconds
        self._lookup = lookup
        self._clock = clock
        self._lock = threading.Lock()
        self._endpoints: tuple[str, ...] = target.endpoints
        self._resolved_at: float | None = None
        self._failing = False

    def endpoints(self) -> tuple[str, ...]:
        """The current endpoints (resolving the DNS name again when the last answer is stale).

        Raises:
            OSError: the very first resolution failed.
        """
        if not self.target.host:
            return self._endpoints
        with self._lock:
            now = self._clock()
            if self._resolved_at is None or now - self._resolved_at >= self.refresh_seconds:
                self._resolve(now)
            return self._endpoints

    def _resolve(self, now: float) -> None:
        try:
            found = tuple(sorted(set(self._lookup(self.target.host, self.target.port))))
        except OSError as e:
            if self._resolved_at is None:
                raise
            if not self._failing:
                logger.warning(
                    "%s: resolving again failed (%s); keeping %d replicas", self.target, e, len(self._endpoints)
                )
            self._failing, self._resolved_at = True, now
            return
        if found and found != self._endpoints:
            logger.info("%s: %d replicas: %s", self.target, len(found), ", ".join(found))
        self._endpoints = found or self._endpoints
        self._failing, self._resolved_at = False, now


class Health:
    """Replicas that failed lately, skipped (tried last) until `cooldown` seconds pass."""

    def __init__(self, cooldown: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.cooldown = cooldown
        self._clock = clock
        self._down_until: dict[str, float] = {}
        self._up_at: dict[str, float] = {}
        self._lock = threading.Lock()

    def mark_down(self, endpoint: str) -> None:
        with self._lock:
            self._down_until[endpoint] = self._clock() + self.cooldown
            self._up_at.pop(endpoint, None)

    def mark_up(self, endpoint: str) -> None:
        with self._lock:
            self._down_until.pop(endpoint, None)
            self._up_at[endpoint] = self._clock()

    def recently_up(self, endpoint: str) -> bool:
        """Whether the replica answered within the last `cooldown` seconds (no need to probe it)."""
        with self._lock:
            return self._clock() - self._up_at.get(endpoint, -1e18) < self.cooldown

    def is_down(self, endpoint: str) -> bool:
        with self._lock:
            return self._down_until.get(endpoint, 0.0) > self._clock()

    def live_first(self, order: Sequence[str]) -> list[str]:
        """`order` with the replicas marked down moved to the end (keeping both parts' order)."""
        down = [e for e in order if self.is_down(e)]
        return [e for e in order if e not in down] + down


class Router:
    """A fleet's routing state, shared by the sync and asyncio fleet clients: endpoints, health, orders.

    Args:
        target: the fleet's addresses (Target.parse).
        replicas_per_model: how many of a model's top replicas share its fetches.
        spread_key: what, besides model and rank, picks among them (default: this host's name).
        refresh_seconds: how often a dns:/// target is resolved again.
        cooldown: seconds a replica that failed is tried last.
    """

    def __init__(
        self,
        target: Target,
        *,
        replicas_per_model: int = 2,
        spread_key: str | None = None,
        refresh_seconds: float = 30.0,
        cooldown: float = 5.0,
    ) -> None:
        if replicas_per_model < 1:
            raise ValueError(f"replicas_per_model {replicas_per_model} must be >= 1")
        self.target = target
        self.replicas_per_model = replicas_per_model
        self.spread_key = socket.gethostname() if spread_key is None else spread_key
        self.resolver = Resolver(target, refresh_seconds)
        self.health = Health(cooldown)

    def endpoints(self) -> tuple[str, ...]:
        return self.resolver.endpoints()

    def owner_order(self, model: str) -> list[str]:
        """Every replica in the model's rendezvous order; the first owns its control state."""
        return rendezvous(model, self.endpoints())

    def fetch_order(self, model: str, rank: int, *, stateful: bool) -> list[str]:
        """The replicas a fetch tries, in order; a fetch that depends on control state starts at the owner."""
        if stateful:
            return self.owner_order(model)
        return fetch_order(
            model, self.endpoints(), rank=rank, spread_key=self.spread_key, replicas_per_model=self.replicas_per_model
        )
