"""Server TLS whose certificates are re-read when their files change, without a restart.

gRPC's dynamic server credentials call a fetcher on every TLS handshake, on gRPC's own
threads; it returns a new certificate configuration or None for "keep the one you have".
Ours `stat()`s the files (Kubernetes swaps a Secret by repointing its `..data` symlink,
which `stat` follows) and re-reads them only when a stamp changed. A new pair is checked
before it replaces the old one: the key must match the leaf certificate, the leaf must not
have expired nor be not yet valid, and the client CA must parse. A half-written rotation
(certificate updated, key not yet) keeps the old pair, logs why once, and is tried again at
the next change; a pair not valid yet is taken once its notBefore has passed.
Connections and streams already open keep the keys they were made with.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

logger = logging.getLogger(__name__)

Stamp = tuple[tuple[int, int, int, int], ...]


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of the server's TLS: certificate chain, key, and the CA for client certificates."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) if self.client_ca is None else (self.cert, self.key, self.client_ca)


@dataclass(frozen=True)
class TlsPems:
    """The files' bytes, checked to make a working configuration."""

    cert: bytes
    key: bytes
    client_ca: bytes | None
    not_before: datetime.datetime
    """When the leaf certificate becomes valid: before then every handshake with it fails."""

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self.key, self.cert)], root_certificates=self.client_ca)


def read_pems(files: TlsFiles, now: datetime.datetime | None = None) -> TlsPems:
    """Read and check the files.

    Raises:
        ValueError: one line naming the file and the problem (unreadable, not PEM, a key
            that does not match the certificate, an expired certificate).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert, key = _read(files.cert, "--tls-cert"), _read(files.key, "--tls-key")
    client_ca = None if files.client_ca is None else _read(files.client_ca, "--tls-client-ca")
    try:
        chain = x509.load_pem_x509_certificates(cert)
    except ValueError as e:
        raise ValueError(f"--tls-cert {files.cert}: not a PEM certificate chain ({e})") from None
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--tls-key {files.key}: not an unencrypted PEM private key ({e})") from None
    leaf = chain[0]
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if private.public_key().public_bytes(encoding, public) != leaf.public_key().public_bytes(encoding, public):
        raise ValueError(f"--tls-key {files.key} does not match the certificate in --tls-cert {files.cert}")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if leaf.not_valid_after_utc <= now:
        raise ValueError(f"--tls-cert {files.cert} expired at {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
    if client_ca is not None:
        try:
            x509.load_pem_x509_certificates(client_ca)
        except ValueError as e:
            raise ValueError(f"--tls-client-ca {files.client_ca}: not a PEM certificate bundle ({e})") from None
    return TlsPems(cert, key, client_ca, leaf.not_valid_before_utc)


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot read ({e.strerror or e})") from None


def stamp(files: TlsFiles) -> Stamp:
    """What changes when any of the files is replaced: inode, size, mtime and ctime of each."""
    stamps = []
    for path in files.paths:
        try:
            st = os.stat(path)
        except OSError:
            stamps.append((0, 0, 0, 0))
            continue
        stamps.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(stamps)


class ReloadingCertificates:
    """The fetcher behind dynamic server credentials: the current pair, re-read on change."""

    def __init__(self, files: TlsFiles, clock: Callable[[], datetime.datetime] = _utc_now) -> None:
        self.files = files
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp = stamp(files)
        self.current = read_pems(files, clock())
        if self.current.not_before > clock():  # nothing older to keep: serve it, and say so
            since = f"{self.current.not_before:%Y-%m-%d %H:%M:%S}"
            logger.warning("--tls-cert %s is not valid before %s UTC", files.cert, since)
        self._early: TlsPems | None = None
        """A checked pair that was not valid yet when its files changed, taken once it is."""
        self.reloads = 0
        self.rejected = 0

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that ask this object for the pair at every handshake."""
        return grpc.dynamic_ssl_server_credentials(
            self.current.configuration(),
            self.fetch,  # type: ignore[arg-type]  # grpc-stubs omit the None that keeps the current pair
            require_client_authentication=self.files.client_ca is not None,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration when the files changed and check out; None keeps the current one.

        A pair not valid yet (a clock ahead at the issuer, a certificate issued for later)
        is refused like an expired one: every handshake with it would fail. It is taken at
        the first handshake after its notBefore, unless the files change again first.
        """
        now = stamp(self.files)
        if now == self._stamp and (self._early is None or self._early.not_before > self._clock()):
            return None
        with self._lock:
            if now == self._stamp and self._early is None:  # another handshake thread got here first
                return None
            pems = self._changed(now) if now != self._stamp else self._early
            if pems is None or pems == self.current or pems.not_before > self._clock():
                return None
            self._early = None
            self.current = pems
            self.reloads += 1
        logger.info("TLS certificate reloaded from %s", self.files.cert)
        return pems.configuration()

    def _changed(self, now: Stamp) -> TlsPems | None:
        """The files' new pair once checked, or None (counted and logged once) when it cannot serve yet."""
        self._stamp, self._early = now, None
        try:
            pems = read_pems(self.files, self._clock())
        except ValueError as e:
            self.rejected += 1
            logger.error("TLS files changed but were not loaded, keeping the previous certificate: %s", e)
            return None
        if pems.not_before > self._clock():
            self.rejected += 1
            self._early = pems
            logger.error(
                "TLS files changed but were not loaded, keeping the previous certificate: --tls-cert %s is not "
                "valid before %s UTC; it is taken then",
                self.files.cert,
                f"{pems.not_before:%Y-%m-%d %H:%M:%S}",
            )
            return None
        return pems
