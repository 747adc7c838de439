"""What one RPC did, gathered while it runs, for its access log line and its trailing metadata.

The observing interceptor (server/interceptors.py) opens a CallRecord for every call and
puts it in a context variable; the servicers and the data plane, which run in the same
task, note what only they know (the model, the shard spec, the bytes sent). Outside a
call, `current_call()` returns a record nobody reads, so that code needs no guard.
"""

from __future__ import annotations

import contextvars
import re
import time
import uuid
from dataclasses import dataclass, field

from weightserve.sharding.spec import ShardSpec

REQUEST_ID_KEY = "x-request-id"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:/-]{1,64}$")


def request_id_from(metadata: object) -> str:
    """The caller's `x-request-id` when it is a short printable token, else a new one."""
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key == REQUEST_ID_KEY and isinstance(value, str) and _SAFE_ID.match(value):
            return value
    return uuid.uuid4().hex[:16]


@dataclass
class CallRecord:
    """One call's facts, filled in as it runs."""

    service: str = ""
    method: str = ""
    peer: str = ""
    request_id: str = ""
    caller: str = ""
    """The name of the caller's token (anonymous without --auth-tokens)."""
    started: float = field(default_factory=time.perf_counter)
    model: str = ""
    shard: str = ""
    """The shard spec in short form: rank/world, pp, ep."""
    bytes: int = 0
    messages: int = 0
    code: str = "OK"
    details: str = ""

    def add_bytes(self, nbytes: int) -> None:
        self.bytes += nbytes

    def note_spec(self, spec: ShardSpec) -> ShardSpec:
        """Note the model and the shard a call serves, as the access log shows them; returns `spec`."""
        self.model = spec.model
        parts = [f"tp {spec.rank}/{spec.world_size}"]
        if spec.pp_size > 1:
            parts.append(f"pp {spec.pp_rank}/{spec.pp_size}")
        if spec.ep_size:
            since = "" if spec.since_mapping is None else f" since v{spec.since_mapping}"
            parts.append(f"ep {spec.ep_rank}/{spec.ep_size}{since}")
        if spec.version is not None:
            parts.append(f"v{spec.version}")
        if spec.since_version is not None:
            parts.append(f"since v{spec.since_version}")
        if spec.layout != "checkpoint":
            parts.append(spec.layout)
        self.shard = " ".join(parts)
        return spec

    def note_model(self, model: str) -> str:
        """Note the model a call is about; returns it."""
        self.model = model
        return model

    def trailing_metadata(self, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
        """The call's trailing metadata: its request id, then `extra`."""
        return ((REQUEST_ID_KEY, self.request_id), *extra) if self.request_id else tuple(extra)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


_CURRENT: contextvars.ContextVar[CallRecord | None] = contextvars.ContextVar("weightserve_call", default=None)


def current_call() -> CallRecord:
    """The record of the call this task serves (a throwaway one outside a call)."""
    record = _CURRENT.get()
    return record if record is not None else CallRecord()


def open_call(record: CallRecord) -> contextvars.Token[CallRecord | None]:
    """Make `record` the current call's; `close_call(token)` undoes it."""
    return _CURRENT.set(record)


def close_call(token: contextvars.Token[CallRecord | None]) -> None:
    _CURRENT.reset(token)
