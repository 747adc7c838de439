"""`weightserve token`: a new random bearer token and its `--auth-tokens` entry.

The token is printed once, on the first line, for the caller to hand to its clients
(a Kubernetes Secret, WEIGHTSERVE_TOKEN); the TOML entry after it holds only the token's
SHA-256, for the server's token file. Nothing is written to disk.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import secrets
import sys

TOKEN_BYTES = 32
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = sub.add_parser("token", help="print a new bearer token and its --auth-tokens entry")
    token.add_argument("--name", required=True, help="shown in logs and metrics (letters, digits, . _ -)")
    token.add_argument(
        "--models", nargs="+", default=[], metavar="GLOB",
        help="models it may read: org/* (within a path segment), org/** (across), hf://meta-llama/*",
    )  # fmt: skip
    token.add_argument("--control", action="store_true", help="ReportExpertLoad, Rebalance, GetRebalance, Watch")
    token.add_argument("--cache", action="store_true", help="Prefetch and Evict")
    token.add_argument(
        "--replica", action="store_true", help="FillReplica: what a fleet replica shows the others (docs/fleet.md)"
    )
    token.add_argument("--max-streams", type=int, default=0, help="concurrent streams of this token (0: no limit)")
    token.add_argument("--bytes-per-second", default="", help="streaming rate of this token, e.g. 2GiB (none)")
    token.set_defaults(run=run_token)


def run_token(args: argparse.Namespace) -> int:
    if not _NAME.match(args.name):
        sys.stderr.write(
            f"weightserve token: --name {args.name[:80]!r} must be 1-64 letters, digits, '.', '_' or '-'\n"
        )
        return 2
    if args.max_streams < 0:
        sys.stderr.write(f"weightserve token: --max-streams {args.max_streams} must be >= 0\n")
        return 2
    if args.bytes_per_second:
        from weightserve.config import parse_size

        try:
            parse_size(args.bytes_per_second)
        except ValueError as e:
            sys.stderr.write(f"weightserve token: --bytes-per-second: {e}\n")
            return 2
    secret = secrets.token_urlsafe(TOKEN_BYTES)
    sys.stdout.write(secret + "\n" + token_entry(args, hashlib.sha256(secret.encode()).hexdigest()))
    return 0


def token_entry(args: argparse.Namespace, digest: str) -> str:
    """The [[tokens]] table of the token (json.dumps writes TOML's basic strings for these values)."""
    lines = [
        "",
        "[[tokens]]",
        f"name = {json.dumps(args.name)}",
        f'sha256 = "{digest}"',
        f"models = [{', '.join(json.dumps(m) for m in args.models)}]",
        f"control = {str(args.control).lower()}",
        f"cache = {str(args.cache).lower()}",
    ]
    if getattr(args, "replica", False):
        lines.append("replica = true")
    if args.max_streams:
        lines.append(f"max_streams = {args.max_streams}")
    if args.bytes_per_second:
        lines.append(f"bytes_per_second = {json.dumps(args.bytes_per_second)}")
    return "\n".join(lines) + "\n"
