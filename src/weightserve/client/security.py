"""How a client reaches a server that wants TLS or a token: channel credentials and call metadata.

Arguments win over the environment: `WEIGHTSERVE_TOKEN`, and `WEIGHTSERVE_TLS_CA`,
`WEIGHTSERVE_TLS_CERT`, `WEIGHTSERVE_TLS_KEY` (paths of PEM files; setting any of them
turns TLS on). A token is sent in `authorization: Bearer ...` metadata on every call, and
only over TLS, to loopback or to a Unix socket: anything else would hand it to whoever
watches the network, so it is refused unless the caller says `allow_insecure_token=True`.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from weightserve.client.call_metadata import is_unix

TOKEN_ENV = "WEIGHTSERVE_TOKEN"
CA_ENV = "WEIGHTSERVE_TLS_CA"
CERT_ENV = "WEIGHTSERVE_TLS_CERT"
KEY_ENV = "WEIGHTSERVE_TLS_KEY"

Pem = bytes | str | Path
"""PEM bytes, or the path of a PEM file."""


@dataclass(frozen=True)
class Security:
    """What a client's channel carries: TLS material (None: plaintext) and a token."""

    token: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None
    """Under TLS, the name the server's certificate must carry when the address's host is not it."""

    def credentials(self) -> grpc.ChannelCredentials | None:
        """The channel's TLS credentials, or None for a plaintext channel."""
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata every call carries (the token)."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def security_from(
    target: str,
    *,
    token: str | None = None,
    tls: bool = False,
    root_certificates: Pem | None = None,
    certificate_chain: Pem | None = None,
    private_key: Pem | None = None,
    allow_insecure_token: bool = False,
    env: Mapping[str, str] | None = None,
    server_name: str | None = None,
) -> Security:
    """The security of a client of `target`, from its arguments and the environment.

    Raises:
        ValueError: a PEM file cannot be read, a certificate comes without its key (or the
            other way round), or a token would travel in plaintext to another host.
    """
    env = os.environ if env is None else env
    token = token or env.get(TOKEN_ENV) or None
    root = _pem(root_certificates if root_certificates is not None else env.get(CA_ENV), "root certificates", CA_ENV)
    chain = _pem(certificate_chain if certificate_chain is not None else env.get(CERT_ENV), "certificate", CERT_ENV)
    key = _pem(private_key if private_key is not None else env.get(KEY_ENV), "private key", KEY_ENV)
    if (chain is None) != (key is None):
        raise ValueError("a client certificate needs its private key and the key its certificate (tls cert and key)")
    tls = tls or root is not None or chain is not None
    if token and not tls and not allow_insecure_token and not is_local(target):
        raise ValueError(
            f"refusing to send a token in plaintext to {target}: use TLS (tls=True, --tls-ca) or, on a "
            "network you trust, allow_insecure_token=True"
        )
    if token and any(c in token for c in "\r\n\x00"):
        raise ValueError("a token cannot hold line breaks or NUL characters")
    return Security(token, tls, root, chain, key, server_name or None)


def is_local(target: str) -> bool:
    """Whether a gRPC target is a Unix socket or a loopback address."""
    if is_unix(target):
        return True
    host = target.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    host = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _pem(value: Pem | None, what: str, variable: str) -> bytes | None:
    if value is None or value == "":
        return None
    if isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the {what} at {value} ({e.strerror or e}; or set {variable})") from None
