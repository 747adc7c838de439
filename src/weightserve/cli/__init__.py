"""`weightserve serve | fetch | ls | prefetch | shard | rebalance | report-load | health | token | demo`.

Building the parser imports only the standard library and weightserve's stdlib-only
modules (config, errors): each subcommand imports torch, grpc and the client or server
inside its run function, so `weightserve --help` answers at once and `serve` does not
pay for the client, nor `ls` for the server.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from weightserve._version import __version__
from weightserve.cli import control, demo, fetch, health, serve, shard, token
from weightserve.errors import FetchError, InvalidRequestError, WeightserveError

SUBCOMMANDS = (serve, fetch, shard, control, health, token, demo)
"""Modules that each add a group of subcommands, in the order --help lists them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weightserve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in SUBCOMMANDS:
        group.add_parsers(sub)
    return parser


def exit_code(error: WeightserveError) -> int:
    """2 for a request refused as invalid (a bad flag value, here or on the server), else 1."""
    if isinstance(error, InvalidRequestError):
        return 2
    code = error.code() if isinstance(error, FetchError) else None
    return 2 if getattr(code, "name", "") == "INVALID_ARGUMENT" else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; a WeightserveError is printed as one line and exits 1 (2 when the request was invalid)."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except WeightserveError as e:
        sys.stderr.write(f"weightserve {args.command}: {e}\n")
        return exit_code(e)
    except KeyboardInterrupt:
        return 130
