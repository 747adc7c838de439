"""`weightserve serve | fetch | ls | shard | rebalance | report-load | demo`.

Building the parser imports only the standard library and weightserve's stdlib-only
modules (config, errors): each subcommand imports torch, grpc and the client or server
inside its run function, so `weightserve --help` answers at once and `serve` does not
pay for the client, nor `ls` for the server.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from weightserve.cli import control, demo, fetch, serve, shard
from weightserve.errors import WeightserveError

SUBCOMMANDS = (serve, fetch, shard, control, demo)
"""Modules that each add a group of subcommands, in the order --help lists them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weightserve", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for group in SUBCOMMANDS:
        group.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; a WeightserveError is printed as one line and exits 1."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except WeightserveError as e:
        sys.stderr.write(f"weightserve {args.command}: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 130
