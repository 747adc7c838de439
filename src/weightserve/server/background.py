"""A server on its own thread and event loop, for the demo, benchmarks and tests."""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType

from weightserve.config import ServerConfig
from weightserve.server.app import Server, build_server


class BackgroundServer:
    """Runs `build_server(config)` on a daemon thread; `address` is ready on enter.

    Example:
        >>> with BackgroundServer(ServerConfig(model_roots=(root,), listen="127.0.0.1:0")) as s:  # doctest: +SKIP
        ...     WeightClient(s.address).list_models()
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.server: Server | None = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="weightserve-server", daemon=True)

    @property
    def address(self) -> str:
        assert self.server is not None
        if self.config.listen.startswith("unix:"):
            return self.config.listen
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.server.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self.server = build_server(self.config)
            self._loop.run_until_complete(self.server.start())
        except BaseException as e:  # reported to the thread that called start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    def start(self) -> BackgroundServer:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def stop(self, grace: float | None = 0) -> None:
        """Drain for `grace` seconds, then stop the loop and join the thread."""
        if self.server is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
