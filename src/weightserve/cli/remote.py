"""What the client commands share: --server (or WEIGHTSERVE_SERVER), --timeout, and a health check.

The clients wait for a server that is not up yet (a worker may start first); a person at
a shell wants to hear at once that nothing listens. So every client command first asks
the standard grpc.health.v1 service, without waiting for the channel: a refused
connection fails that call at once ("no weightserve at localhost:50052: connection
refused"). grpc is imported inside the functions, so building the parser stays light.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import TYPE_CHECKING, Any

from weightserve.errors import FetchError, InvalidRequestError, UnavailableError

if TYPE_CHECKING:
    import grpc

    from weightserve.client import WeightClient
    from weightserve.client.security import Security

SERVER_VARIABLE = "WEIGHTSERVE_SERVER"
SERVER_NAME_VARIABLE = "WEIGHTSERVE_TLS_SERVER_NAME"

_REASONS = (
    ("connection refused", "connection refused"),
    ("dns resolution failed", "the host name does not resolve"),
    ("errors resolving", "the host name does not resolve"),
    ("no such file or directory", "no such socket"),
    ("permission denied", "permission denied"),
    ("connection reset", "the connection was reset"),
)
"""Phrases of gRPC's UNAVAILABLE details, lower-cased, and how a one-line message says them."""


def positive_seconds(text: str) -> float:
    """A --timeout value: seconds > 0 (argparse reports anything else with the usage)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0 seconds")
    return value


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive_int(text: str) -> int:
    """A size such as --world-size: a whole number >= 1 (the wire's 0-means-1 is no value to give)."""
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def non_negative_int(text: str) -> int:
    """An index such as --rank: a whole number >= 0."""
    value = _whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def add_server_args(parser: argparse.ArgumentParser, timeout: float = 60.0, timeout_help: str = "") -> None:
    """--server, defaulting to $WEIGHTSERVE_SERVER (required without it), and --timeout."""
    default = os.environ.get(SERVER_VARIABLE) or None
    parser.add_argument(
        "--server", default=default, required=default is None,
        help=f"HOST:PORT or unix:PATH (default: ${SERVER_VARIABLE}{f', now {default}' if default else ''})",
    )  # fmt: skip
    parser.add_argument(
        "--timeout", type=positive_seconds, default=timeout, metavar="S",
        help=timeout_help or f"seconds each call may wait for the server (default {timeout:g})",
    )  # fmt: skip
    parser.add_argument("--token", help="bearer token for a server with --auth-tokens (default $WEIGHTSERVE_TOKEN)")
    parser.add_argument(
        "--tls", action="store_true", help="speak TLS, trusting the system's CAs (implied by --tls-ca or --tls-cert)"
    )
    parser.add_argument("--tls-ca", metavar="PEM", help="CA bundle of the server's certificate ($WEIGHTSERVE_TLS_CA)")
    parser.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS ($WEIGHTSERVE_TLS_CERT)")
    parser.add_argument("--tls-key", metavar="PEM", help="key of --tls-cert ($WEIGHTSERVE_TLS_KEY)")
    parser.add_argument(
        "--tls-server-name", metavar="NAME", default=os.environ.get(SERVER_NAME_VARIABLE) or None,
        help="the name the server's certificate carries when --server's host is not it, e.g. a probe to "
        f"127.0.0.1 (${SERVER_NAME_VARIABLE})",
    )  # fmt: skip


def security_of(args: argparse.Namespace) -> Security:
    """The TLS and token a client command uses: its flags over the WEIGHTSERVE_* variables.

    Raises:
        ValueError: a PEM file cannot be read, or a token would go in plaintext to another host.
    """
    from weightserve.client.call_metadata import target
    from weightserve.client.routing import Target, is_fleet
    from weightserve.client.security import security_from

    try:
        if is_fleet(args.server):
            Target.parse(args.server)  # each replica's address, before anything dials
        return security_from(
            target(args.server),
            token=getattr(args, "token", None),
            tls=getattr(args, "tls", False),
            root_certificates=getattr(args, "tls_ca", None),
            certificate_chain=getattr(args, "tls_cert", None),
            private_key=getattr(args, "tls_key", None),
            server_name=getattr(args, "tls_server_name", None),
        )
    except ValueError as e:  # one line, exit 2: the command was given something unusable
        raise InvalidRequestError(str(e)) from None


def client_options(security: Security) -> dict[str, Any]:
    """The WeightClient / AsyncWeightClient keyword arguments of `security`."""
    return {
        "token": security.token,
        "tls": security.tls,
        "root_certificates": security.root_certificates,
        "certificate_chain": security.certificate_chain,
        "private_key": security.private_key,
        "server_name": security.server_name,
    }


def health_status(address: str, service: str = "", timeout: float = 5.0, security: Security | None = None) -> str:
    """The standard health status of `service` ("" for the whole server) at `address`: SERVING, NOT_SERVING, ...

    The call does not wait for the channel to become ready, so nothing listening fails it
    at once; a server that accepts connections but never answers fails it after `timeout`.

    Raises:
        UnavailableError: nothing answers there (the message says why, in one line).
        FetchError: any other failure; NOT_FOUND when the server knows no such service.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from weightserve.client.call_metadata import target as target_of  # grpc only: no torch for a probe

    target = target_of(address)
    credentials = security.credentials() if security is not None else None
    if credentials is None:
        channel = grpc.insecure_channel(target)
    else:
        named = [("grpc.ssl_target_name_override", security.server_name)] if security and security.server_name else []
        channel = grpc.secure_channel(target, credentials, options=named)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            raise _failure(address, service, timeout, e) from None
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def _failure(address: str, service: str, timeout: float, error: grpc.RpcError) -> Exception:
    import grpc

    code = error.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        details = (error.details() or "").lower()
        reason = next((said for phrase, said in _REASONS if phrase in details), error.details() or "unavailable")
        return UnavailableError(f"no weightserve at {address}: {reason}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return UnavailableError(f"no answer from {address} within {timeout:g}s")
    if code == grpc.StatusCode.NOT_FOUND:
        return FetchError(f"{address} has no service {service!r} (NOT_FOUND)", code)
    return FetchError(f"health of {address}: {code.name}: {error.details()}", code)


def reach(address: str, timeout: float, security: Security | None = None) -> None:
    """Return once something answers gRPC at `address`; raise UnavailableError at once when nothing listens.

    Any answer will do (a draining server's NOT_SERVING, a server without the health
    service): the command's own call then says what is wrong.
    """
    with contextlib.suppress(FetchError):
        health_status(address, timeout=timeout, security=security)


def connect(args: argparse.Namespace) -> WeightClient:
    """A WeightClient for --server with --timeout, once something answers there."""
    from weightserve.client import WeightClient
    from weightserve.client.routing import is_fleet

    security = security_of(args)
    if not is_fleet(args.server):  # a fleet ("a,b", dns:///) probes each replica itself and skips dead ones
        reach(args.server, args.timeout, security)
    return WeightClient(args.server, timeout=args.timeout, **client_options(security))
