"""Server configuration: one frozen dataclass, read from WEIGHTSERVE_* variables.

CLI flags override the environment. Stdlib only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
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


LOADERS = ("safetensors", "fastsafetensors")
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

    def __post_init__(self) -> None:
        if self.loader not in LOADERS:
            raise ValueError(f"loader {self.loader!r} must be one of {LOADERS}")
        if not 4096 <= self.chunk_bytes <= 4 * MiB - 16 * 1024:
            raise ValueError(f"chunk_bytes {self.chunk_bytes} must be within [4096, 4 MiB - 16 KiB]")
        if self.read_threads < 1:
            raise ValueError(f"read_threads {self.read_threads} must be >= 1")
        if self.eplb_window < 1:
            raise ValueError(f"eplb_window {self.eplb_window} must be >= 1")
        if self.prefetch_depth < 1:
            raise ValueError(f"prefetch_depth {self.prefetch_depth} must be >= 1")
        if self.cache_memory < 0 or self.disk_cache_bytes < 0:
            raise ValueError("cache_memory and disk_cache_bytes must be >= 0")
        # `not x >= 0` rather than `x < 0`: NaN fails every comparison and must be refused
        if not self.grace_seconds >= 0 or not self.keepalive_seconds > 0 or not self.keepalive_timeout_seconds > 0:
            raise ValueError("grace_seconds must be >= 0 and keepalive times > 0 (and not NaN)")
        if ":" not in self.listen and not self.listen.startswith("unix:"):
            raise ValueError(f"listen {self.listen!r} must be HOST:PORT or unix:PATH")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ServerConfig:
        """Build from WEIGHTSERVE_* variables, then apply non-None `overrides` (CLI flags).

        WEIGHTSERVE_MODEL_ROOTS holds paths separated by os.pathsep; WEIGHTSERVE_DUMMY
        holds NAME=CONFIG.json pairs separated by commas.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None:
                continue
            if f.name == "model_roots":
                values[f.name] = tuple(Path(p) for p in raw.split(os.pathsep) if p)
            elif f.name == "allow_source":
                values[f.name] = tuple(p for p in raw.split(",") if p)
            elif f.name == "dummy":
                values[f.name] = tuple(parse_dummy(p) for p in raw.split(",") if p.strip())
            elif f.name in ("sharding_rules", "disk_cache_dir"):
                values[f.name] = Path(raw) if raw else None
            elif f.name in ("cache_memory", "disk_cache_bytes"):
                values[f.name] = parse_size(raw)
            elif f.type in ("int", int):
                values[f.name] = int(raw)
            elif f.type in ("float", float):
                values[f.name] = float(raw)
            else:
                values[f.name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
