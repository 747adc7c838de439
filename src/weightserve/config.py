"""Server configuration: one frozen dataclass, read from WEIGHTSERVE_* variables.

CLI flags override the environment. Stdlib only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

ENV_PREFIX = "WEIGHTSERVE_"
MiB = 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    """Everything `weightserve serve` needs; see the README's table for each variable."""

    model_roots: tuple[Path, ...] = ()
    listen: str = "127.0.0.1:50051"
    chunk_bytes: int = 4 * MiB - 16 * 1024
    read_threads: int = 8
    read_ahead: int = 2
    grace_seconds: float = 30.0
    keepalive_seconds: float = 30.0
    keepalive_timeout_seconds: float = 10.0
    log_level: str = "INFO"
    sharding_rules: Path | None = None

    def __post_init__(self) -> None:
        if not 4096 <= self.chunk_bytes <= 4 * MiB - 16 * 1024:
            raise ValueError(f"chunk_bytes {self.chunk_bytes} must be within [4096, 4 MiB - 16 KiB]")
        if self.read_threads < 1:
            raise ValueError(f"read_threads {self.read_threads} must be >= 1")
        if self.read_ahead < 1:
            raise ValueError(f"read_ahead {self.read_ahead} must be >= 1")
        if self.grace_seconds < 0 or self.keepalive_seconds <= 0 or self.keepalive_timeout_seconds <= 0:
            raise ValueError("grace_seconds must be >= 0 and keepalive times > 0")
        if ":" not in self.listen and not self.listen.startswith("unix:"):
            raise ValueError(f"listen {self.listen!r} must be HOST:PORT or unix:PATH")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ServerConfig:
        """Build from WEIGHTSERVE_* variables, then apply non-None `overrides` (CLI flags).

        WEIGHTSERVE_MODEL_ROOTS holds paths separated by os.pathsep.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None:
                continue
            if f.name == "model_roots":
                values[f.name] = tuple(Path(p) for p in raw.split(os.pathsep) if p)
            elif f.name == "sharding_rules":
                values[f.name] = Path(raw) if raw else None
            elif f.type in ("int", int):
                values[f.name] = int(raw)
            elif f.type in ("float", float):
                values[f.name] = float(raw)
            else:
                values[f.name] = raw
        config = cls(**values)
        set_overrides = {k: v for k, v in overrides.items() if v is not None}
        return replace(config, **set_overrides) if set_overrides else config
