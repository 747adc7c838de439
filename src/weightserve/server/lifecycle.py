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
    try:
        await server.start()
    except BaseException:
        # A port taken between the CLI's check and the bind: close what did start, on this
        # loop, rather than leave grpc to clean up after the loop is gone.
        await server.stop(0)
        raise
    side = f", metrics and probes on http://{server.side.address}" if server.side is not None else ""
    control = ""
    if server.control_server:
        control = f", control on {bound_address(config.control_listen, server.control_port)}"
    security = ("TLS" if server.certificates else "plaintext") + (", tokens" if server.tokens else "")
    logger.info(
        "weightserve listening on %s (%s)%s%s; %d models under %s",
        bound_address(config.listen, server.port), security, control, side, server.models_at_start,
        [str(r) for r in config.model_roots],
    )  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if server.tokens is not None:
        tokens = server.tokens
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, tokens.reload))
    await stop.wait()
    logger.info("draining: refusing new calls, waiting up to %.0fs for streams in flight", config.grace_seconds)
    await server.stop(config.grace_seconds)
    logger.info("stopped")


def bound_address(address: str, port: int) -> str:
    """Where a listener is, for the start-up line: `host:port` with the port bound (port 0
    picks one), or a Unix socket's address as given (its "port" is grpc's 1 for success)."""
    if address.startswith("unix"):  # unix:PATH, unix://ABSOLUTE, unix-abstract:NAME
        return address
    return f"{address.rsplit(':', 1)[0]}:{port}"


def main(config: ServerConfig) -> None:
    """Process entry: uvloop where available."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))
