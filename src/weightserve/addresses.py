"""Address settings (--listen, --control-listen, --metrics-listen, --advertise, --coordination)
and the server addresses clients dial, checked as text.

A port is refused unless it is a decimal number within 0-65535. The layers below do
not refuse it: grpc takes a listen port modulo 2^16 (127.0.0.1:116156 listened on
50620, beside whatever expected that port) and the socket module raises OverflowError.
Each parser returns its text unchanged, so the settings stay the strings the operator
wrote; a ValueError says what is wrong without repeating the value, which the caller
names with its flag, variable or file key. Stdlib only.
"""

from __future__ import annotations

from urllib.parse import urlsplit

MAX_PORT = 65535
UNIX_PREFIXES = ("unix:", "unix-abstract:")
GRPC_SCHEMES = ("ipv4:", "ipv6:", "dns:", "vsock:")
"""Targets gRPC parses itself (lists of addresses, an explicit resolver): passed as written."""
REDIS_SCHEMES = ("redis", "rediss")


def host_port(text: str) -> tuple[str, int]:
    """(host, port) of `HOST:PORT` or `[V6]:PORT`; the host may be empty (every address).

    Raises:
        ValueError: no port, a port that is not a decimal number, or one above 65535.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()):
        raise ValueError("must be HOST:PORT with a port number within 0-65535")
    number = int(port)
    if number > MAX_PORT:
        raise ValueError(f"port {number} is outside 0-65535")
    return host.removeprefix("[").removesuffix("]"), number


def listen_address(text: str) -> str:
    """A gRPC listen address: `HOST:PORT`, `unix:PATH` or `unix-abstract:NAME`.

    Raises:
        ValueError: neither, or a port outside 0-65535.
    """
    if text.startswith(UNIX_PREFIXES):
        if not text.partition(":")[2]:
            raise ValueError("must name the socket: unix:PATH")
        return text
    if ":" not in text:
        raise ValueError("must be HOST:PORT or unix:PATH")
    host_port(text)
    return text


def dial_address(text: str) -> str:
    """A server address a client dials: `HOST:PORT`, `[V6]:PORT`, `unix:PATH`, `unix-abstract:NAME`
    or a bare `/path`; gRPC's own `ipv4:`, `ipv6:`, `dns:` and `vsock:` targets pass as written.

    Unchecked, "" reached gRPC core (which logged a C++ source line and failed every
    call UNKNOWN), "localhost" dialled port 443, and port 99999 read "connection refused".

    Raises:
        ValueError: empty, no port, a port outside 1-65535, or no host.
    """
    if text.startswith("/") or text.startswith(GRPC_SCHEMES):
        return text
    if text.startswith(UNIX_PREFIXES):
        if not text.partition(":")[2]:
            raise ValueError("must name the socket: unix:PATH")
        return text
    if not text:
        raise ValueError("is empty: give HOST:PORT or unix:PATH")
    host, port = host_port(text)
    if not host:
        raise ValueError("must name a host: HOST:PORT")
    if port == 0:
        raise ValueError("port 0 cannot be dialled: give the server's port")
    return text


def optional_listen_address(text: str) -> str:
    """A listen address, or "" for none (--control-listen)."""
    return text and listen_address(text)


def metrics_address(text: str) -> str:
    """`HOST:PORT`, "off", or "" (the gRPC host on the default port).

    Raises:
        ValueError: anything else, or a port outside 0-65535.
    """
    if text in ("", "off"):
        return text
    if ":" not in text:
        raise ValueError("must be HOST:PORT, or off")
    host_port(text)
    return text


def peer_address(text: str) -> str:
    """`HOST:PORT` other replicas dial (--advertise), or "" for the listen address.

    Raises:
        ValueError: no HOST:PORT, an empty host, or a port outside 0-65535.
    """
    if not text:
        return text
    host, _ = host_port(text)
    if not host:
        raise ValueError("must name a host other replicas reach: HOST:PORT")
    return text


def redis_url(text: str) -> str:
    """`redis://HOST:PORT[/DB]` (or rediss://), or "" for no coordination.

    Raises:
        ValueError: another scheme, no host, or a port outside 0-65535.
    """
    if not text:
        return text
    parts = urlsplit(text)
    if parts.scheme not in REDIS_SCHEMES or not parts.hostname:
        raise ValueError("must be redis://HOST:PORT (or rediss://)")
    try:
        parts.port  # noqa: B018 - urllib checks the port when it is read
    except ValueError:
        raise ValueError(f"port {parts.netloc.rpartition(':')[2]!r} must be a number within 0-65535") from None
    return text
