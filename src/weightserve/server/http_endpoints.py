"""The plain-HTTP side port: /metrics for Prometheus, /readyz and /livez for the kubelet.

The kubelet's gRPC probes cannot speak TLS, so readiness and liveness are answered here
in plaintext, next to the metrics (which name models, so the port binds no wider than
the gRPC one by default). /readyz is 200 once the model roots were scanned and until a
drain begins; /livez is 200 while the event loop answers within a second (a draining
server is still alive).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

logger = logging.getLogger(__name__)

LIVENESS_SECONDS = 1.0


class SidePort:
    """Serves /metrics, /readyz and /livez on its own thread."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        ready: Callable[[], bool],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.registry = registry
        self.ready = ready
        self.loop = loop
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self.address = f"{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="weightserve-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def alive(self) -> bool:
        """Whether the event loop runs a callback within LIVENESS_SECONDS."""
        try:
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), self.loop).result(LIVENESS_SECONDS)
        except (FutureTimeout, RuntimeError):
            return False
        return True

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        side = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                logger.debug("http %s", format % args)

            def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(side.registry), CONTENT_TYPE_LATEST)
                elif path == "/readyz":
                    ready = side.ready()
                    self._send(200 if ready else 503, b"ready\n" if ready else b"not ready\n")
                elif path == "/livez":
                    alive = side.alive()
                    self._send(200 if alive else 503, b"alive\n" if alive else b"event loop not answering\n")
                else:
                    self._send(404, b"not found: try /metrics, /readyz or /livez\n")

            do_HEAD = do_GET

        return Handler
