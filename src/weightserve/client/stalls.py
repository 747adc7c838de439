"""Giving up a stream that went quiet, so the fetch resumes instead of waiting forever.

Keepalive finds a dead connection, but not a live server whose stream stopped moving
(a storage read that hangs, a wedged handler): a FetchShard stream has no deadline, so
its client waited for the next chunk for ever. A watch cancels the stream in hand once
it has delivered something and then nothing for `RetryPolicy.stream_idle_timeout`; the
fetch then resumes from its last verified byte like after any other break. Before a
stream's first message nothing is timed: a server may spend minutes loading a cold
model before it sends a byte.

The watch reads a progress counter the fetch keeps anyway (bytes received), so a
message costs nothing more; it looks a few times per timeout, on a thread (sync) or a
task (asyncio).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc

TICKS_PER_TIMEOUT = 4
"""Looks per timeout: a stall is seen within 1.25 timeouts."""


class StalledStream(grpc.RpcError):
    """The stream the watch cancelled, as a retryable DEADLINE_EXCEEDED the resume loop understands."""

    def __init__(self, idle: float) -> None:
        super().__init__()
        self.idle = idle

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return f"the stream sent nothing for {self.idle:g}s after its last chunk (RetryPolicy.stream_idle_timeout)"

    def trailing_metadata(self) -> tuple[Any, ...]:
        return ()


class _Progress:
    """What both watches share: whether the stream in hand moved within the timeout."""

    def __init__(self, idle: float, progress: Callable[[], int]) -> None:
        self.idle = idle
        self.progress = progress
        self.stalled = False
        self._start = self._seen = 0
        self._moved_at = 0.0

    def begin(self) -> None:
        self.stalled = False
        self._start = self._seen = self.progress()
        self._moved_at = time.monotonic()

    def is_stalled(self) -> bool:
        """Called each tick: True once the stream delivered and then stood still for the timeout."""
        now, seen = time.monotonic(), self.progress()
        if seen != self._seen:
            self._seen, self._moved_at = seen, now
            return False
        return seen > self._start and now - self._moved_at >= self.idle

    def explain(self, error: BaseException) -> BaseException:
        """The StalledStream the watch caused, or `error` itself."""
        return StalledStream(self.idle) if self.stalled else error


class StallWatch:
    """Cancels the stream in hand when it stalls (sync clients; one thread per fetch, started on first use).

    Example:
        >>> watch = StallWatch(60.0, lambda: loop.stats.bytes_received)  # doctest: +SKIP
        >>> with watch.watching(stream):  # doctest: +SKIP
        ...     for message in stream:
        ...         ...
        >>> # in `except grpc.RpcError as e`: loop.on_rpc_error(watch.explain(e))
    """

    def __init__(self, idle: float | None, progress: Callable[[], int]) -> None:
        self._state = None if idle is None else _Progress(idle, progress)
        self._stream: Any = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watching(self, stream: Any) -> Iterator[None]:
        """Watch `stream` (anything with cancel()) while the block reads it."""
        state = self._state
        if state is None:
            yield
            return
        with self._lock:
            state.begin()
            self._stream = stream
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="weightserve-stall-watch", daemon=True)
            self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._stream = None

    def explain(self, error: grpc.RpcError) -> grpc.RpcError:
        """StalledStream when the watch cancelled the stream that raised `error`, else `error`."""
        return error if self._state is None else self._state.explain(error)  # type: ignore[return-value]

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        state = self._state
        assert state is not None
        while not self._stop.wait(state.idle / TICKS_PER_TIMEOUT):
            with self._lock:
                if self._stream is not None and not state.stalled and state.is_stalled():
                    state.stalled = True
                    self._stream.cancel()

    def __enter__(self) -> StallWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStallWatch:
    """StallWatch for asyncio clients: a task per stream, and the cancelled read's CancelledError explained."""

    def __init__(self, idle: float | None, progress: Callable[[], int]) -> None:
        self._state = None if idle is None else _Progress(idle, progress)

    @contextlib.asynccontextmanager
    async def watching(self, stream: Any) -> AsyncIterator[None]:
        """Watch `stream` while the block reads it; a read the watch cancelled raises StalledStream.

        grpc.aio ends a locally cancelled call with asyncio.CancelledError; that is turned
        into StalledStream only when the watch cancelled it and the task itself is not
        being cancelled (Python 3.11+ can tell; 3.10 trusts the watch).
        """
        state = self._state
        if state is None:
            yield
            return
        state.begin()
        watcher = asyncio.get_running_loop().create_task(self._run(state, stream))
        try:
            yield
        except asyncio.CancelledError:
            task = asyncio.current_task()
            cancelling = getattr(task, "cancelling", lambda: 0)()
            if not state.stalled or cancelling:
                raise
            raise StalledStream(state.idle) from None
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    @staticmethod
    async def _run(state: _Progress, stream: Any) -> None:
        while True:
            await asyncio.sleep(state.idle / TICKS_PER_TIMEOUT)
            if state.is_stalled():
                state.stalled = True
                stream.cancel()
                return
