"""Server configuration: one frozen dataclass, read from WEIGHTSERVE_* variables.

CLI flags override the environment. A WEIGHTSERVE_* variable that names no setting
stops the server (with the closest known name): a typo would otherwise leave a
setting silently at its default. Stdlib only.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "WEIGHTSERVE_"
MiB = 1024 * 1024


_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "KB": 1000,
    "M": 10**6,
    "MB": 10**6,
    "G": 10**9,
    "GB": 10**9,
    "T": 10**12,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str) -> int:
    """Bytes from '20GiB', '512MB', '1.5G' or a plain integer.

    Raises:
        ValueError: not a size.
    """
    match = _SIZE.match(text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size (try 20GiB, 512MB or a byte count)")
    return int(float(match.group(1)) * _UNITS[unit])


def parse_bool(text: str) -> bool:
    """True for 1/true/yes/on, False for 0/false/no/off (any case).

    Raises:
        ValueError: anything else.
    """
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (use true or false)")


PROCESS_RESERVE = 8 * MiB
"""Growth of a serving process that no cache entry accounts for (gRPC buffers, plans)."""

MAX_EPLB_WINDOW = 2**14
"""Load reports a window may sum; with counts <= 2^48 (state/load.py) an int64 sum cannot overflow."""


def reserved_bytes(read_threads: int, chunk_bytes: int) -> int:
    """What a memory budget sets aside before caching anything: the read pool's buffers and
    PROCESS_RESERVE, so the process's growth, not just the cache's, stays in budget."""
    return PROCESS_RESERVE + read_threads * chunk_bytes


LOADERS = ("safetensors", "fastsafetensors")

LOG_FORMATS = ("text", "json")
"""Readers of safetensors files a server may use (`--loader`)."""


def parse_dummy(text: str) -> tuple[str, Path]:
    """('org/model', Path('config.json')) from 'org/model=config.json'.

    Raises:
        ValueError: not NAME=PATH.
    """
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise ValueError(f"{text!r} is not NAME=CONFIG.json")
    return name.strip(), Path(path.strip())


def default_read_threads() -> int:
    """One read thread per core, at most 8: page-cache reads and checksums are CPU work
    that holds the GIL between calls, and more threads than cores only contend for it
    (measured: 8 threads on 2 cores cost 1.9x the CPU per GB of 2 threads for 8-way
    tensor-parallel streams). Raise --read-threads for slow network storage."""
    return max(1, min(8, os.cpu_count() or 1))


@dataclass(frozen=True)
class ServerConfig:
    """Everything `weightserve serve` needs; see the README's table for each variable."""

    model_roots: tuple[Path, ...] = ()
    listen: str = "127.0.0.1:50051"
    chunk_bytes: int = 4 * MiB - 16 * 1024
    read_threads: int = field(default_factory=default_read_threads)
    prefetch_depth: int = 2
    cache_memory: int = 0
    allow_source: tuple[str, ...] = ()
    disk_cache_dir: Path | None = None
    disk_cache_bytes: int = 0
    grace_seconds: float = 30.0
    keepalive_seconds: float = 30.0
    keepalive_timeout_seconds: float = 10.0
    log_level: str = "INFO"
    sharding_rules: Path | None = None
    eplb_window: int = 1000
    loader: str = "safetensors"
    dummy: tuple[tuple[str, Path], ...] = ()
    in_place_messages: bool = True
    """Read chunk payloads straight into the outgoing message (server/message_buffer.py)."""
    max_streams: int = 256
    max_streams_per_peer: int = 64
    stream_idle_seconds: float = 60.0
    metrics_listen: str = ""
    """HOST:PORT of /metrics, /readyz and /livez; "" is the gRPC host on port 9400; "off" disables."""
    log_format: str = "text"
    allow_missing_roots: bool = False

    def __post_init__(self) -> None:
        if self.loader not in LOADERS:
            raise ValueError(f"loader {self.loader!r} must be one of {LOADERS}")
        if not 4096 <= self.chunk_bytes <= 4 * MiB - 16 * 1024:
            raise ValueError(f"chunk_bytes {self.chunk_bytes} must be within [4096, 4 MiB - 16 KiB]")
        if self.max_streams < 1 or self.max_streams_per_peer < 1:
            raise ValueError(
                f"max_streams {self.max_streams} and max_streams_per_peer {self.max_streams_per_peer} must be >= 1"
            )
        if not self.stream_idle_seconds > 0:
            raise ValueError(f"stream_idle_seconds {self.stream_idle_seconds} must be > 0")
        if self.read_threads < 1:
            raise ValueError(f"read_threads {self.read_threads} must be >= 1")
        if not 1 <= self.eplb_window <= MAX_EPLB_WINDOW:
            raise ValueError(f"eplb_window {self.eplb_window} must be within [1, {MAX_EPLB_WINDOW}]")
        if self.prefetch_depth < 1:
            raise ValueError(f"prefetch_depth {self.prefetch_depth} must be >= 1")
        if self.cache_memory < 0 or self.disk_cache_bytes < 0:
            raise ValueError("cache_memory and disk_cache_bytes must be >= 0")
        least = reserved_bytes(self.read_threads, self.chunk_bytes) + self.prefetch_depth * self.chunk_bytes
        if 0 < self.cache_memory < least:
            raise ValueError(
                f"cache_memory {self.cache_memory} is below the {least} bytes the read pool ({self.read_threads} "
                f"threads x chunk_bytes {self.chunk_bytes}, plus {PROCESS_RESERVE} for the process) and one "
                f"stream's window (prefetch_depth {self.prefetch_depth} x chunk_bytes) need: every fetch would "
                "fail; give at least that, or 0 to stream through the page cache"
            )
        # `not x >= 0` rather than `x < 0`: NaN fails every comparison and must be refused
        if not self.grace_seconds >= 0 or not self.keepalive_seconds > 0 or not self.keepalive_timeout_seconds > 0:
            raise ValueError("grace_seconds must be >= 0 and keepalive times > 0 (and not NaN)")
        if ":" not in self.listen and not self.listen.startswith("unix:"):
            raise ValueError(f"listen {self.listen!r} must be HOST:PORT or unix:PATH")
        if self.metrics_listen not in ("", "off") and not re.fullmatch(r".*:\d{1,5}", self.metrics_listen):
            raise ValueError(f"metrics_listen {self.metrics_listen!r} must be HOST:PORT, or off")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format {self.log_format!r} must be one of {LOG_FORMATS}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ServerConfig:
        """Build from WEIGHTSERVE_* variables, then apply non-None `overrides` (CLI flags).

        WEIGHTSERVE_MODEL_ROOTS holds paths separated by os.pathsep; WEIGHTSERVE_DUMMY
        holds NAME=CONFIG.json pairs separated by commas.

        Raises:
            ValueError: an unknown WEIGHTSERVE_* variable, or a value that does not parse
                or is out of range (the message names the variable).
        """
        env = os.environ if env is None else env
        check_variables(env)
        values: dict[str, Any] = {}
        for f in fields(cls):
            variable = ENV_PREFIX + f.name.upper()
            raw = env.get(variable)
            if raw is None or overrides.get(f.name) is not None:
                continue
            try:
                values[f.name] = _parser(f.name, f.type)(raw)
            except ValueError as e:
                raise ValueError(f"{variable}={raw[:80]!r}: {e}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


_FIELD_PARSERS: dict[str, Callable[[str], Any]] = {
    "model_roots": lambda raw: tuple(Path(p) for p in raw.split(os.pathsep) if p),
    "allow_source": lambda raw: tuple(p for p in raw.split(",") if p),
    "dummy": lambda raw: tuple(parse_dummy(p) for p in raw.split(",") if p.strip()),
    "sharding_rules": lambda raw: Path(raw) if raw else None,
    "disk_cache_dir": lambda raw: Path(raw) if raw else None,
    "cache_memory": parse_size,
    "disk_cache_bytes": parse_size,
}
_TYPE_PARSERS: dict[object, Callable[[str], Any]] = {"int": int, "float": float, "bool": parse_bool}


def _parser(name: str, annotation: object) -> Callable[[str], Any]:
    return _FIELD_PARSERS.get(name) or _TYPE_PARSERS.get(annotation, str)


OTHER_VARIABLES = {
    "WEIGHTSERVE_DEMO_DIR": "where `weightserve demo` keeps its generated checkpoint",
    "WEIGHTSERVE_BENCH_DIR": "where benchmarks keep their generated checkpoints",
}
"""Documented WEIGHTSERVE_* variables that are not server settings (the README lists them)."""

KUBERNETES_VARIABLES = re.compile(
    r"^WEIGHTSERVE_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)$"
)
"""What Kubernetes injects into every pod for a Service named `weightserve` (service links)."""


def setting_variables() -> list[str]:
    """The variable of every ServerConfig field."""
    return [ENV_PREFIX + f.name.upper() for f in fields(ServerConfig)]


def check_variables(env: Mapping[str, str]) -> None:
    """Refuse a WEIGHTSERVE_* variable that is neither a setting nor a known other variable.

    Raises:
        ValueError: one line naming the variable and the closest known one.
    """
    known = setting_variables() + list(OTHER_VARIABLES)
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name in known or KUBERNETES_VARIABLES.match(name):
            continue
        suffixes = {k.removeprefix(ENV_PREFIX): k for k in known}
        close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), suffixes, n=1, cutoff=0.7)
        hint = f"; did you mean {suffixes[close[0]]}?" if close else f"; settings are {', '.join(setting_variables())}"
        raise ValueError(f"unknown setting {name[:80]}{hint}")
