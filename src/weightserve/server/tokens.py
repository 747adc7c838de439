"""Bearer tokens and what each may do, from the `--auth-tokens` TOML file.

One table per token; the file holds a token's SHA-256, never the token:

    [[tokens]]
    name = "workers"                 # shown in logs and metrics
    sha256 = "9f86d0..."             # hex SHA-256 of the token
    models = ["org/*", "hf://meta-llama/*"]
    control = false                  # ReportExpertLoad, Rebalance, GetRebalance, WatchExpertMapping
    cache = false                    # Prefetch, Evict
    publish = false                  # publishing weight versions
    replica = false                  # replica-to-replica fills
    max_streams = 16                 # concurrent streams of this token (optional)
    bytes_per_second = "2GiB"        # streaming rate of this token, all its streams (optional)

A model glob matches canonical model names: `*` matches within one path segment (it never
crosses `/`), `**` matches across segments, `?` one character of a segment. TokenFile
re-reads the file when it changes or on SIGHUP; a bad file, or one that holds no token,
keeps the tokens in force.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from weightserve.config import parse_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

logger = logging.getLogger(__name__)

SCOPES = ("control", "cache", "publish", "replica")
"""The rights a token may hold beyond reading its models."""

_KEYS = ("name", "sha256", "models", *SCOPES, "max_streams", "bytes_per_second")
_HEX_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_TOKENS = 10_000
STAT_INTERVAL = 1.0
"""Seconds between looks at the file's stamp from the request path."""


def token_digest(secret: str) -> str:
    """The hex SHA-256 of a token, as the file holds it."""
    return hashlib.sha256(secret.encode()).hexdigest()


def compile_glob(pattern: str) -> re.Pattern[str]:
    """A model glob as a regular expression: `*` within a segment, `**` across, `?` one character."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


@dataclass(frozen=True)
class Token:
    """One token's name and rights."""

    name: str
    sha256: str
    models: tuple[str, ...] = ()
    control: bool = False
    cache: bool = False
    publish: bool = False
    replica: bool = False
    max_streams: int = 0
    """Concurrent streams of this token; 0 is no limit beyond the server's."""
    bytes_per_second: int = 0
    """Streaming rate over all this token's streams; 0 is unlimited."""

    @cached_property
    def _globs(self) -> tuple[re.Pattern[str], ...]:
        return tuple(compile_glob(m) for m in self.models)

    def may_read(self, model: str) -> bool:
        """Whether the token covers `model` (a canonical name)."""
        return any(glob.fullmatch(model) for glob in self._globs)

    def may(self, scope: str) -> bool:
        """Whether the token holds `scope` ('' for reading, or one of SCOPES)."""
        return not scope or bool(getattr(self, scope))


ANONYMOUS = Token(name="anonymous", sha256="", models=("**",), control=True, cache=True, publish=True, replica=True)
"""The caller when the server checks no tokens: every model, every scope."""

UNKNOWN = Token(name="unknown", sha256="")
"""The caller of a refused call with no token, or one the server does not know: nothing."""


def parse_tokens(text: str, source: str) -> dict[str, Token]:
    """Tokens by hex digest, from the file's TOML text.

    Raises:
        ValueError: one line naming the file, the entry and what is wrong.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{source}: not TOML ({e})") from None
    unknown = sorted(set(data) - {"tokens"})
    if unknown:
        raise ValueError(f"{source}: unknown table {unknown[0]!r}; tokens are [[tokens]] entries")
    entries = data.get("tokens", [])
    if not isinstance(entries, list) or len(entries) > MAX_TOKENS:
        raise ValueError(f"{source}: tokens must be a list of at most {MAX_TOKENS} [[tokens]] tables")
    tokens: dict[str, Token] = {}
    names: set[str] = set()
    for index, entry in enumerate(entries):
        token = _token(entry, f"{source}: token {index + 1}")
        if token.name in names:
            raise ValueError(f"{source}: token name {token.name!r} is used twice")
        if token.sha256 in tokens:
            raise ValueError(f"{source}: tokens {tokens[token.sha256].name!r} and {token.name!r} have the same sha256")
        names.add(token.name)
        tokens[token.sha256] = token
    return tokens


def _token(entry: object, where: str) -> Token:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: not a table")
    for key in entry:
        if key not in _KEYS:
            close = difflib.get_close_matches(key, _KEYS, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else f"keys are {', '.join(_KEYS)}"
            raise ValueError(f"{where}: unknown key {str(key)[:80]!r}; {hint}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{where}: name must be 1-64 letters, digits, '.', '_' or '-'")
    where = f"{where} ({name})"
    digest = entry.get("sha256")
    if not isinstance(digest, str) or not _HEX_SHA256.match(digest.lower()):
        raise ValueError(f"{where}: sha256 must be the token's SHA-256 as 64 hex digits")
    models = entry.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise ValueError(f"{where}: models must be a list of model globs")
    scopes = {}
    for scope in SCOPES:
        value = entry.get(scope, False)
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {scope} must be true or false")
        scopes[scope] = value
    max_streams = entry.get("max_streams", 0)
    if not isinstance(max_streams, int) or isinstance(max_streams, bool) or not 0 <= max_streams <= 1_000_000:
        raise ValueError(f"{where}: max_streams must be a whole number from 0 (no limit) to 1000000")
    rate = entry.get("bytes_per_second", 0)
    try:
        rate = parse_size(rate) if isinstance(rate, str) else rate
    except ValueError as e:
        raise ValueError(f"{where}: bytes_per_second: {e}") from None
    if not isinstance(rate, int) or isinstance(rate, bool) or rate < 0:
        raise ValueError(f"{where}: bytes_per_second must be a size (2GiB) or a byte count, 0 for unlimited")
    return Token(name, digest.lower(), tuple(models), **scopes, max_streams=max_streams, bytes_per_second=rate)


class TokenFile:
    """The tokens in force, re-read when the file changes (looked at once a second) or on `reload()`.

    A file that fails to parse, or holds no token, keeps the tokens in force and logs why;
    the server never starts without a file that parses (one with no tokens refuses every
    call until tokens are added).
    """

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self.tokens = self._read()
        self._looked = self._now()
        self.reloads = 0
        self.rejected = 0

    def lookup(self, secret: str) -> Token | None:
        """The token whose SHA-256 is `secret`'s, or None."""
        return self.find(token_digest(secret))

    def find(self, digest: str) -> Token | None:
        """The token in force with this hex SHA-256, or None; the file is looked at as `lookup` does.

        Open watch streams ask this again as they go, so a revoked token's watch ends.
        """
        if self._now() - self._looked >= STAT_INTERVAL:
            self._looked = self._now()
            if self._stat() != self._stamp:
                self.reload()
        return self.tokens.get(digest)

    def reload(self) -> bool:
        """Read the file again; False (tokens unchanged) when it is unreadable, invalid or holds no token.

        A file with no tokens is what a truncating editor, `> tokens.toml` or a copy caught
        half-way leaves for a moment; taking it would lock every caller out until the next
        change, so it is refused like a broken one. To revoke every token, stop the server.
        """
        with self._lock:
            self._stamp = self._stat()
            try:
                tokens = self._read()
                if not tokens and self.tokens:
                    raise ValueError(f"--auth-tokens {self.path}: holds no [[tokens]] (empty or caught mid-write?)")
            except ValueError as e:
                self.rejected += 1
                logger.error("auth tokens not reloaded, keeping the %d in force: %s", len(self.tokens), e)
                return False
            self.tokens = tokens
            self.reloads += 1
        logger.info("auth tokens reloaded from %s: %d tokens", self.path, len(tokens))
        return True

    def _read(self) -> dict[str, Token]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or e
            raise ValueError(f"--auth-tokens {self.path}: cannot read it ({reason})") from None
        return parse_tokens(text, f"--auth-tokens {self.path}")

    def _stat(self) -> tuple[int, int, int, int]:
        try:
            st = os.stat(self.path)
        except OSError:
            return (0, 0, 0, 0)
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _now(self) -> float:
        return self._clock()
