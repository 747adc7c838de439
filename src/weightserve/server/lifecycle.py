"""Running the server in its process: serve until SIGTERM or SIGINT, then drain.

On a signal, health goes NOT_SERVING (and /readyz 503), new RPCs are refused and streams
in flight get `grace_seconds` to finish; `main` is the process entry (uvloop where it
is installed).
"""

from __future__ import annotations

import asyncio
import logging
import signal

from weightserve.config import ServerConfig
from weightserve.server.build import build_server

logger = logging.getLogger(__name__)


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain gracefully."""
    server = build_server(config)
    await server.start()
    host = config.listen.rsplit(":", 1)[0]
    side = f", metrics and probes on http://{server.side.address}" if server.side is not None else ""
    logger.info(
        "weightserve listening on %s:%d%s; %d models under %s",
        host, server.port, side, server.models_at_start, [str(r) for r in config.model_roots],
    )  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("draining: refusing new calls, waiting up to %.0fs for streams in flight", config.grace_seconds)
    await server.stop(config.grace_seconds)
    logger.info("stopped")


def main(config: ServerConfig) -> None:
    """Process entry: uvloop where available."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))
