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

from weightserve import addresses

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


def parse_int(text: str) -> int:
    """An integer from its decimal text.

    Raises:
        ValueError: not a whole number.
    """
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text[:80]!r} is not a whole number") from None


def parse_float(text: str) -> float:
    """A number (of seconds, mostly) from its text.

    Raises:
        ValueError: not a number.
    """
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{text[:80]!r} is not a number") from None


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
"""Readers of safetensors files a server may use (`--loader`)."""

LOG_FORMATS = ("text", "json")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
"""`--log-level` names, accepted in any case."""


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
    tls_cert: Path | None = None
    """PEM certificate chain of the server; with tls_key, the gRPC port speaks TLS only."""
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    """CA bundle that client certificates must chain to: mutual TLS."""
    auth_tokens: Path | None = None
    """TOML file of bearer tokens and their scopes (server/tokens.py); no file, no token check."""
    control_listen: str = ""
    """HOST:PORT or unix:PATH serving ControlService, Prefetch and Evict apart from the data port."""
    socket_mode: str = ""
    """Octal permissions (e.g. 0660) of the Unix sockets, the shared-memory side socket too; "": the umask's."""
    state_dir: Path | None = None
    """Where published versions (and, later, control state) persist; none: version 0 only."""
    max_versions: int = 0
    """Published versions kept per model (0: all); leased ones and the newest are always kept."""
    coordination: str = ""
    """redis://HOST:PORT: replicas take a lease there so one of them downloads a remote model (docs/fleet.md)."""
    advertise: str = ""
    """HOST:PORT other replicas reach this one at for replica fill; "" is the --listen address."""
    lease_seconds: float = 30.0
    """Expiry of a download lease in Redis; renewed every third of it while the download runs."""

    def __post_init__(self) -> None:
        if self.loader not in LOADERS:
            raise ValueError(f"loader {self.loader!r} must be one of {', '.join(LOADERS)}")
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
        _check_fleet(self.coordination, self.lease_seconds)
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
        for name, check in _ADDRESS_PARSERS.items():
            value = getattr(self, name)
            try:
                check(value)
            except ValueError as e:
                raise ValueError(f"{name} {value!r}: {e}") from None
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format {self.log_format!r} must be one of {', '.join(LOG_FORMATS)}")
        self._check_access()
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level {self.log_level!r} must be one of {', '.join(LOG_LEVELS)} (any case)")
        object.__setattr__(self, "log_level", self.log_level.upper())  # frozen: the one normalisation

    def _check_access(self) -> None:
        """TLS files come in pairs, mTLS needs TLS, the control address is an address of its own."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both, or neither for plaintext")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca asks clients for certificates over TLS: give tls_cert and tls_key too")
        if self.max_versions < 0:
            raise ValueError(f"max_versions {self.max_versions} must be >= 0 (0 keeps every version)")
        if self.socket_mode and not re.fullmatch(r"0?[0-7]{3}", self.socket_mode):
            raise ValueError(f"socket_mode {self.socket_mode!r} must be octal permissions such as 0660")
        if self.control_listen and self.control_listen == self.listen and not self.listen.endswith(":0"):
            raise ValueError(f"control_listen {self.control_listen!r} must differ from listen")

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        file_values: Mapping[str, object] | None = None,
        file_name: str = "the config file",
        **overrides: Any,
    ) -> ServerConfig:
        """Build from a config file, then WEIGHTSERVE_* variables, then non-None `overrides` (CLI flags).

        Each source overrides the one before it: flag > variable > file > default. A
        variable's text and a file's value go through the same parser (parse_setting);
        WEIGHTSERVE_MODEL_ROOTS holds paths separated by os.pathsep, WEIGHTSERVE_DUMMY
        NAME=CONFIG.json pairs separated by commas.

        Args:
            env: the variables (default os.environ).
            file_values: settings read from a file, by field name, as TOML gives them
                (weightserve.config_file.load_settings).
            file_name: how errors name the file.
            **overrides: typed values by field name; None means not given.

        Raises:
            ValueError: an unknown WEIGHTSERVE_* variable, or a value that does not parse
                or is out of range (the message names the variable or the file's key).
        """
        env = os.environ if env is None else env
        check_variables(env)
        file_values = file_values or {}
        values: dict[str, Any] = {}
        for f in fields(cls):
            if overrides.get(f.name) is not None:
                continue
            variable = ENV_PREFIX + f.name.upper()
            raw = env.get(variable)
            if raw is not None:
                try:
                    values[f.name] = parse_setting(f.name, raw)
                except ValueError as e:
                    raise ValueError(f"{variable}={raw[:80]!r}: {e}") from None
            elif f.name in file_values:
                value = file_values[f.name]
                try:
                    values[f.name] = parse_setting(f.name, value)
                except ValueError as e:
                    raise ValueError(f"{file_name}: {f.name} = {str(value)[:80]!r}: {e}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def settings(self) -> dict[str, str | int | float | bool | list[str]]:
        """Every setting in field order, as TOML values that parse_setting turns back into this one.

        Unset paths are "" (which parses to None) and dummy models "NAME=CONFIG.json".
        """
        out: dict[str, str | int | float | bool | list[str]] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "dummy":
                out[f.name] = [f"{name}={path}" for name, path in value]
            elif isinstance(value, tuple):
                out[f.name] = [str(item) for item in value]
            elif value is None or isinstance(value, Path):
                out[f.name] = "" if value is None else str(value)
            else:
                out[f.name] = value
        return out


def _check_fleet(coordination: str, lease_seconds: float) -> None:
    if not lease_seconds > 0:
        raise ValueError(f"lease_seconds {lease_seconds} must be > 0")


_LIST_SETTINGS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "model_roots": (os.pathsep, Path),
    "allow_source": (",", str),
    "dummy": (",", parse_dummy),
}
"""Settings that hold several values: the separator in a variable's text, and each value's parser."""

_ADDRESS_PARSERS: dict[str, Callable[[str], str]] = {
    "listen": addresses.listen_address,
    "control_listen": addresses.optional_listen_address,
    "metrics_listen": addresses.metrics_address,
    "advertise": addresses.peer_address,
    "coordination": addresses.redis_url,
}
"""Address settings: checked as text when parsed (so a flag's error names the flag) and again when built."""

_FIELD_PARSERS: dict[str, Callable[[str], Any]] = {
    **_ADDRESS_PARSERS,
    "sharding_rules": lambda raw: Path(raw) if raw else None,
    "disk_cache_dir": lambda raw: Path(raw) if raw else None,
    "tls_cert": lambda raw: Path(raw) if raw else None,
    "tls_key": lambda raw: Path(raw) if raw else None,
    "tls_client_ca": lambda raw: Path(raw) if raw else None,
    "auth_tokens": lambda raw: Path(raw) if raw else None,
    "state_dir": lambda raw: Path(raw) if raw else None,
    "chunk_bytes": parse_size,
    "cache_memory": parse_size,
    "disk_cache_bytes": parse_size,
}
_TYPE_PARSERS: dict[object, Callable[[str], Any]] = {"int": parse_int, "float": parse_float, "bool": parse_bool}
_TYPE_NAMES = {"int": "a whole number", "float": "a number", "bool": "true or false"}


_ANNOTATIONS: dict[str, object] = {f.name: f.type for f in fields(ServerConfig)}

FILE_SETTINGS = tuple(name for name, annotation in _ANNOTATIONS.items() if annotation == "Path | None")
"""Settings that name a file (a key, a token file): printed as paths, never masked as secrets."""


def _parser(name: str, annotation: object) -> Callable[[str], Any]:
    return _FIELD_PARSERS.get(name) or _TYPE_PARSERS.get(annotation, str)


def setting_names() -> list[str]:
    """Every ServerConfig field name, in field order: the keys a config file may use."""
    return [f.name for f in fields(ServerConfig)]


def parse_setting(name: str, value: object) -> Any:
    """A setting's typed value from a variable's or flag's text, a repeated flag's texts or a TOML value.

    Text goes through the setting's parser (sizes take units: 20GiB); a list setting
    takes a list of texts, or one text split as its variable is; integers, numbers and
    booleans may also come as TOML gives them.

    Raises:
        ValueError: not a setting, or a value that does not parse (range checks are
            ServerConfig's).
    """
    annotation = _ANNOTATIONS.get(name)
    if annotation is None:
        raise ValueError(f"no setting {name!r}")
    if name in _LIST_SETTINGS:
        separator, item = _LIST_SETTINGS[name]
        parts = value.split(separator) if isinstance(value, str) else value
        if not isinstance(parts, (list, tuple)) or not all(isinstance(p, str) for p in parts):
            raise ValueError(f"{value!r} is not a list of strings")
        return tuple(item(p) for p in parts if p.strip())
    if isinstance(value, str):
        return _parser(name, annotation)(value)
    if isinstance(value, bool):  # before int: a bool is an int
        if annotation == "bool":
            return value
    elif isinstance(value, int) and annotation in ("int", "float"):
        return value if annotation == "int" else float(value)
    elif isinstance(value, float) and annotation == "float":
        return value
    wanted = "a size" if _FIELD_PARSERS.get(name) is parse_size else _TYPE_NAMES.get(str(annotation), "a string")
    raise ValueError(f"{value!r} is not {wanted}")


OTHER_VARIABLES = {
    "WEIGHTSERVE_DEMO_DIR": "where `weightserve demo` keeps its generated checkpoint",
    "WEIGHTSERVE_BENCH_DIR": "where benchmarks keep their generated checkpoints",
    "WEIGHTSERVE_CONFIG": "a TOML file of settings for `weightserve serve` (what --config names)",
    "WEIGHTSERVE_SERVER": "the server the client commands call when --server is not given",
    "WEIGHTSERVE_TOKEN": "the bearer token clients and client commands send (what --token gives)",
    "WEIGHTSERVE_TLS_CA": "PEM CA bundle clients check the server's certificate against; turns TLS on",
    "WEIGHTSERVE_TLS_SERVER_NAME": "the name client commands expect in the server's certificate (a health check)",
    "WEIGHTSERVE_REPLICA_TOKEN": "a token with the replica scope a fleet replica shows the others' FillReplica",
    "WEIGHTSERVE_REPLICA_SERVER_NAME": "the name the fleet replicas' certificates carry (the headless Service)",
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
