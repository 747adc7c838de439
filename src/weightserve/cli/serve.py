"""`weightserve serve`: the gRPC server, configured by flags over WEIGHTSERVE_* variables over a TOML file.

Flag values are text that the configuration parses, as it parses variables and the
file: a bad value is one line naming the flag, the value and what is allowed (exit 2),
not argparse's usage text, which stays for what is not a value (an unknown flag).
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
from pathlib import Path
from typing import Any

from weightserve.config import (
    FILE_SETTINGS,
    LOADERS,
    LOG_FORMATS,
    LOG_LEVELS,
    ServerConfig,
    parse_setting,
    setting_names,
)
from weightserve.config_file import dump_settings, load_settings

CONFIG_VARIABLE = "WEIGHTSERVE_CONFIG"


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument(
        "--config", type=Path, metavar="FILE",
        help=f"TOML file of settings by name (model_roots = [...]); variables, flags win (default ${CONFIG_VARIABLE})",
    )  # fmt: skip
    serve.add_argument("--print-config", action="store_true", help="print the effective settings as TOML and exit")
    serve.add_argument("--model-root", dest="model_roots", action="append", help="directory of models (repeatable)")
    serve.add_argument("--listen", help="HOST:PORT or unix:PATH (default 127.0.0.1:50051)")
    serve.add_argument("--read-threads", help="threads reading checkpoint files (default: cores, at most 8)")
    serve.add_argument("--chunk-bytes", help="payload bytes per chunk, e.g. 1MiB (default 4 MiB - 16 KiB)")
    serve.add_argument("--grace-seconds", help="drain time on SIGTERM (default 30)")
    serve.add_argument("--log-level", help=f"{', '.join(LOG_LEVELS)}, any case (default INFO)")
    serve.add_argument("--sharding-rules", help="TOML rules for architectures without built-in ones")
    serve.add_argument("--cache-memory", help="bytes of chunks kept in memory, e.g. 20GiB (default 0)")
    serve.add_argument("--prefetch-depth", help="chunks read ahead of each stream (default 2)")
    serve.add_argument("--eplb-window", help="expert load reports summed per model (default 1000)")
    serve.add_argument(
        "--allow-source", action="append", help="remote names clients may ask for: hf://*, s3://bucket/prefix/*"
    )
    serve.add_argument("--disk-cache-dir", help="where remote models are downloaded")
    serve.add_argument("--disk-cache-bytes", help="disk cache budget, e.g. 500GiB (default: no limit)")
    serve.add_argument(
        "--loader", help=f"reader of safetensors files: {', '.join(LOADERS)} (holds whole models in memory)"
    )
    serve.add_argument(
        "--dummy", action="append", metavar="NAME=CONFIG.json",
        help="serve generated random weights for CONFIG.json as model NAME (repeatable)",
    )  # fmt: skip
    serve.add_argument("--max-streams", help="data streams served at once (default 256)")
    serve.add_argument("--max-streams-per-peer", help="data streams from one IP or process (default 64)")
    serve.add_argument("--stream-idle-seconds", help="cut a stream whose client reads nothing this long (default 60)")
    serve.add_argument(
        "--metrics-listen",
        help="HOST:PORT of /metrics, /readyz and /livez (default: the --listen host, port 9400; off)",
    )
    serve.add_argument("--log-format", help=f"log lines as {' or '.join(LOG_FORMATS)} (default text)")
    serve.add_argument(
        "--allow-missing-roots", action="store_true", default=None,
        help="start even when a --model-root is missing or unreadable (a volume mounted later)",
    )  # fmt: skip
    serve.add_argument("--tls-cert", help="PEM certificate chain: serve TLS only (re-read when the file changes)")
    serve.add_argument("--tls-key", help="PEM private key of --tls-cert")
    serve.add_argument("--tls-client-ca", help="PEM CA bundle: clients must show a certificate it signed (mTLS)")
    serve.add_argument("--auth-tokens", help="TOML file of bearer tokens and their scopes (reloaded on change, SIGHUP)")
    serve.add_argument(
        "--control-listen", help="HOST:PORT or unix:PATH for ControlService, Prefetch and Evict (default: --listen)"
    )
    serve.add_argument(
        "--socket-mode", help="octal permissions of unix:PATH sockets, e.g. 0660 for workers in the socket's group"
    )
    serve.add_argument("--state-dir", help="where published weight versions persist (none: version 0 only)")
    serve.add_argument("--max-versions", help="published versions kept per model (default 0: all)")
    serve.add_argument("--coordination", help="redis://HOST:PORT: one replica of a fleet downloads each remote model")
    serve.add_argument("--advertise", help="HOST:PORT other replicas reach this one at (default: --listen)")
    serve.add_argument("--lease-seconds", help="expiry of a download lease in Redis (default 30)")
    flags = {a.dest: a.option_strings[0] for a in serve._actions if a.dest in setting_names()}
    serve.set_defaults(run=run_serve, setting_flags=flags)


def run_serve(args: argparse.Namespace) -> int:
    try:
        config = _config(args)
    except ValueError as e:  # a bad or unknown setting: one line, not a traceback
        sys.stderr.write(f"weightserve serve: {e}\n")
        return 2
    if args.print_config:
        sys.stdout.write(dump_settings(config.settings(), plain=FILE_SETTINGS))
        return 0
    return _serve(config)


def _serve(config: ServerConfig) -> int:
    from weightserve.server import log_setup
    from weightserve.server.build import metrics_address
    from weightserve.server.lifecycle import main as serve_main

    log_setup.configure(config.log_level, config.log_format)
    if not config.model_roots and not config.dummy and not config.allow_source:
        need = "at least one --model-root, --allow-source or --dummy (or WEIGHTSERVE_MODEL_ROOTS)"
        sys.stderr.write(f"weightserve serve: give {need}\n")
        return 2
    metrics = None if config.metrics_listen == "off" else metrics_address(config)
    listens = [("--listen", _tcp_address(config.listen)), ("--metrics-listen", metrics)]
    if config.control_listen:
        listens.append(("--control-listen", _tcp_address(config.control_listen)))
    for flag, address in listens:
        problem = bind_problem(*address) if address is not None else None
        if address is not None and problem:  # said before grpc tries, whose failure also logs from its C core
            sys.stderr.write(f"weightserve serve: {flag} {_join(*address)}: cannot listen there ({problem})\n")
            return 2
    try:
        serve_main(config)
    except ValueError as e:  # a missing model root, a bad dummy model: found while building the server
        sys.stderr.write(f"weightserve serve: {e}\n")
        return 2
    except ImportError as e:  # a setting that needs an extra not installed: our message says which
        if "pip install" not in str(e):
            raise
        sys.stderr.write(f"weightserve serve: {e}\n")
        return 2
    except (OSError, RuntimeError) as e:  # grpc's bind failure is a RuntimeError; the side port's an OSError
        if isinstance(e, RuntimeError) and "bind" not in str(e):
            raise
        sys.stderr.write(f"weightserve serve: {bind_failure(e, config.listen, metrics)}\n")
        return 2
    return 0


def _tcp_address(listen: str) -> tuple[str, int] | None:
    """(host, port) of a HOST:PORT listen address; None for a Unix socket or a port that is not a number."""
    if listen.startswith("unix:"):
        return None
    host, _, port = listen.rpartition(":")
    return (host.strip("[]"), int(port)) if port.isdigit() else None


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_problem(host: str, port: int) -> str | None:
    """Why a TCP server could not listen on host:port (the system's words), or None when it can.

    Tries what a server does: bind with SO_REUSEADDR, on each address the host resolves
    to; one that binds is enough (as grpc needs only one). Port 0 always can.
    """
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return f"cannot resolve {host!r}: {e.strerror}"
    problem = None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as e:
                problem = problem or _bind_reason(e)
                continue
            return None
    return problem


_BIND_HINTS = {
    errno.EADDRINUSE: "is another server running there?",
    errno.EADDRNOTAVAIL: "the host is no address of this machine",
    errno.EACCES: "ports below 1024 need privileges",
}


def _bind_reason(error: OSError) -> str:
    hint = _BIND_HINTS.get(error.errno or 0)
    return f"{error.strerror or error}{f'; {hint}' if hint else ''}"


def bind_failure(error: OSError | RuntimeError, listen: str, metrics: tuple[str, int] | None) -> str:
    """A failure to listen in one line: grpc's is a RuntimeError (or names the address), the side port's not."""
    if str(error).startswith("--"):  # already one line naming its flag (the control port's)
        return str(error)
    if isinstance(error, RuntimeError) or metrics is None or listen in str(error):
        return f"--listen {listen}: cannot listen there (is another server running there?)"
    reason = _bind_reason(error)
    return f"--metrics-listen {_join(*metrics)}: cannot listen there ({reason})"


def _config(args: argparse.Namespace) -> ServerConfig:
    """The configuration: a TOML file, overridden by WEIGHTSERVE_* variables, overridden by the flags given.

    Raises:
        ValueError: one line naming the flag, variable or file key and its value.
    """
    path = args.config or os.environ.get(CONFIG_VARIABLE) or None
    file_values = load_settings(Path(path), setting_names()) if path else {}
    flags: dict[str, Any] = {}
    for name, flag in args.setting_flags.items():
        raw = getattr(args, name)
        if raw is None:
            continue
        try:
            flags[name] = parse_setting(name, raw)
        except ValueError as e:
            shown = " ".join(raw) if isinstance(raw, list) else raw
            raise ValueError(f"{flag} {str(shown)[:80]!r}: {e}") from None
    return ServerConfig.from_env(file_values=file_values, file_name=f"config file {path}", **flags)
