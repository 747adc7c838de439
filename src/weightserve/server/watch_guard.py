"""Watch streams end when their token is no longer in force.

Revoking a token lets the calls already streaming finish, which works for a fetch: it
ends. A watch (WatchVersions, WatchExpertMapping) never ends by itself, so a revoked
token's watch would go on receiving new versions and keep its serving lease pinning
retention. `while_allowed` asks again before each message and every RECHECK_SECONDS
while none comes (so a token file changed with no other call arriving is still seen),
and ends the stream with the refusal, closing the watch first so its lease is released.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

WATCH_METHODS = frozenset({"WatchVersions", "WatchExpertMapping"})
"""Streams that run until the caller stops: the ones a revocation must end."""
RECHECK_SECONDS = 1.0
"""How often a waiting watch asks whether its token is still in force (the token file is
itself looked at no more than once a second)."""

T = TypeVar("T")


async def while_allowed(
    messages: AsyncIterator[T], refusal: Callable[[], Exception | None], every: float = RECHECK_SECONDS
) -> AsyncIterator[T]:
    """`messages`, until `refusal()` returns an error: asked before each message and every `every` seconds.

    Raises:
        Exception: what `refusal()` returned, after `messages` is closed (its `finally`
            blocks have run).
    """
    pending: asyncio.Future[T] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(messages.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=every)
            error = refusal()
            if error is not None:
                raise error
            if not done:
                continue
            finished, pending = pending, None
            try:
                message = finished.result()
            except StopAsyncIteration:
                return
            yield message
    finally:
        if pending is not None:  # the watch waits inside this task: cancelling it runs its finally
            pending.cancel()
            await asyncio.wait({pending})
            if not pending.cancelled():
                pending.exception()  # retrieved: the caller gets the refusal, not a stray "never retrieved"
        aclose = getattr(messages, "aclose", None)
        if aclose is not None:
            await aclose()
