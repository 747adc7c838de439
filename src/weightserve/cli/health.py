"""`weightserve health`: the standard gRPC health check, for container probes and scripts."""

from __future__ import annotations

import argparse
import sys

from weightserve.cli.remote import add_server_args, health_status, security_of


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    health = sub.add_parser("health", help="check a server's gRPC health: exit 0 when SERVING, 1 otherwise")
    add_server_args(health, timeout=5.0, timeout_help="seconds to wait for the answer (default 5)")
    health.add_argument("--service", default="", help="a service name (default: the whole server)")
    health.set_defaults(run=run_health)


def run_health(args: argparse.Namespace) -> int:
    """One line: the status (exit 0 only for SERVING), or why there is none (exit 1, from main)."""
    status = health_status(args.server, args.service, args.timeout, security_of(args))
    service = f" {args.service}" if args.service else ""
    sys.stdout.write(f"{args.server}{service}: {status}\n")
    return 0 if status == "SERVING" else 1
