"""Starting a process under a memory cap: a memory cgroup where this machine allows it, RLIMIT_DATA otherwise.

A cgroup caps what the kernel charges the process (its heap, its mappings, the page
cache it dirties) and OOM-kills it past the cap, as Kubernetes would; RLIMIT_DATA only
makes large allocations fail, which is the next best thing without root.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _own_cgroup_dir() -> tuple[Path, str] | None:
    """(directory of this process's memory cgroup, the limit file's name), if it can hold children."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and (CGROUP_ROOT / "cgroup.controllers").is_file():  # cgroup v2
            if "memory" in (CGROUP_ROOT / "cgroup.controllers").read_text().split():
                return CGROUP_ROOT / path.lstrip("/"), "memory.max"
        elif "memory" in controllers.split(","):  # cgroup v1
            return CGROUP_ROOT / "memory" / path.lstrip("/"), "memory.limit_in_bytes"
    return None


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path | None]:
    """A fresh child memory cgroup capped at `limit` bytes (removed after), or None where that is not allowed."""
    found = _own_cgroup_dir()
    if found is None or os.geteuid() != 0:
        yield None
        return
    parent, limit_file = found
    group = parent / f"weightserve-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
        (group / limit_file).write_text(str(limit))
    except OSError:
        with contextlib.suppress(OSError):
            group.rmdir()
        yield None
        return
    try:
        yield group
    finally:
        with contextlib.suppress(OSError):
            group.rmdir()


def capped(group: Path | None, limit: int) -> tuple[Callable[[], None], str]:
    """A preexec_fn that puts the child in `group` (or caps its RLIMIT_DATA), and what it used."""
    if group is not None:
        procs = group / "cgroup.procs"

        def join() -> None:
            procs.write_text(str(os.getpid()))

        return join, f"memory cgroup {group.name} ({limit >> 20} MiB)"

    def rlimit() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    return rlimit, f"RLIMIT_DATA {limit >> 20} MiB"


def peak_usage(group: Path | None) -> int | None:
    """The cgroup's peak memory charge, where the kernel reports one."""
    if group is None:
        return None
    for name in ("memory.peak", "memory.max_usage_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            return int((group / name).read_text())
    return None


def start_capped(
    argv: list[str], group: Path | None, limit: int, **popen: object
) -> tuple[subprocess.Popen[bytes], str]:
    """Start `argv` under the cap; returns the process and a description of the cap."""
    preexec, how = capped(group, limit)
    proc = subprocess.Popen(argv, preexec_fn=preexec, **popen)  # type: ignore[call-overload]  # noqa: PLW1509
    return proc, how
