"""What TLS and tokens cost a fetch: throughput and server CPU, against plaintext in the same run.

Three `weightserve serve` processes over the ~1 GiB bf16 checkpoint, page-cache reads:
  - plaintext, no tokens (the baseline);
  - plaintext with --auth-tokens (every call checked, the stream admitted per token);
  - TLS with --auth-tokens (what a shared network gets).
Each fetch_state_dict runs in a fresh client process, the three interleaved --repeat
times; figures are the best throughput and the median server CPU seconds per GB.

Prints throughput and CPU ratios against plaintext. Target: tokens cost at most 5% CPU
(the check is per call, not per chunk). TLS has no target: its cost is AES-GCM over every
byte, reported so that a deployment can weigh it (a node-local Unix socket needs none).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    bench_root,
    ensure_checkpoint,
    free_port,
    print_table,
    run_worker,
    serve_command,
    server_cpu,
    subprocess_server,
)

MODEL = "bench/llama-1g"
TOKEN = "benchmark-token"
TARGET_TOKEN_CPU = 1.05


def _client(address: str, ca: str) -> dict[str, float]:
    from weightserve.client import WeightClient

    options = {"token": TOKEN} | ({"root_certificates": Path(ca)} if ca else {})
    with WeightClient(address, **options) as client:  # type: ignore[arg-type]
        client.list_models()  # connect (and handshake) first: time the fetch
        start = time.perf_counter()
        state = client.fetch_state_dict(MODEL)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": sum(t.numel() * t.element_size() for t in state.values())}


def write_security_files(folder: Path) -> tuple[Path, Path, Path, Path]:
    """A CA, the server's pair it signed, and a token file holding TOKEN."""
    from weightserve.server.tokens import token_digest
    from weightserve.testing import make_ca, make_leaf

    ca = make_ca()
    cert, key = make_leaf(ca, "weightserve").write(folder, "server")
    (folder / "ca.crt").write_bytes(ca.cert)
    tokens = folder / "tokens.toml"
    tokens.write_text(f'[[tokens]]\nname = "bench"\nsha256 = "{token_digest(TOKEN)}"\nmodels = ["**"]\n')
    return cert, key, folder / "ca.crt", tokens


def gbps(result: dict[str, float]) -> float:
    return result["bytes"] / result["seconds"] / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--worker", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.worker:
        sys.stdout.write(json.dumps(_client(args.worker[0], args.worker[1] if len(args.worker) > 1 else "")) + "\n")
        return 0

    import grpc

    root = bench_root()
    ensure_checkpoint(root)
    script = Path(__file__).resolve()
    with tempfile.TemporaryDirectory() as folder:
        cert, key, ca, tokens = write_security_files(Path(folder))
        plain, tokened, tls = (f"127.0.0.1:{free_port()}" for _ in range(3))
        credentials = grpc.ssl_channel_credentials(ca.read_bytes())
        secured = ["--tls-cert", str(cert), "--tls-key", str(key), "--auth-tokens", str(tokens)]
        with (
            subprocess_server(serve_command(root, plain), plain) as plain_server,
            subprocess_server(serve_command(root, tokened, "--auth-tokens", str(tokens)), tokened) as token_server,
            subprocess_server(serve_command(root, tls, *secured), tls, credentials) as tls_server,
        ):
            run_worker(script, plain, "")  # warm the page cache
            runs: dict[str, list[dict[str, float]]] = {"plain": [], "tokens": [], "tls": []}
            cpu: dict[str, list[float]] = {"plain": [], "tokens": [], "tls": []}
            for _ in range(args.repeat):
                for name, server, address, trust in (
                    ("plain", plain_server, plain, ""),
                    ("tokens", token_server, tokened, ""),
                    ("tls", tls_server, tls, str(ca)),
                ):
                    with server_cpu(server.pid) as used:
                        runs[name].append(run_worker(script, address, trust))
                    cpu[name].append(used.seconds / (runs[name][-1]["bytes"] / 1e9))

    best = {name: max(gbps(r) for r in results) for name, results in runs.items()}
    cpu_per_gb = {name: median(values) for name, values in cpu.items()}
    token_cpu = cpu_per_gb["tokens"] / cpu_per_gb["plain"]
    rows = [
        ("checkpoint", f"{runs['plain'][0]['bytes'] / 1e9:.2f} GB bf16, {MODEL}, page cache"),
        ("fetch, plaintext", f"{best['plain']:.2f} GB/s, server {cpu_per_gb['plain']:.3f} CPU s/GB"),
        ("fetch, tokens", f"{best['tokens']:.2f} GB/s, server {cpu_per_gb['tokens']:.3f} CPU s/GB"),
        ("fetch, TLS + tokens", f"{best['tls']:.2f} GB/s, server {cpu_per_gb['tls']:.3f} CPU s/GB"),
        ("throughput tokens / plaintext", f"{best['tokens'] / best['plain']:.3f}"),
        ("throughput TLS / plaintext", f"{best['tls'] / best['plain']:.3f}"),
        ("server CPU tokens / plaintext", f"{token_cpu:.3f}  (target <= {TARGET_TOKEN_CPU})"),
        ("server CPU TLS / plaintext", f"{cpu_per_gb['tls'] / cpu_per_gb['plain']:.3f}"),
    ]
    print_table(rows)
    if token_cpu > TARGET_TOKEN_CPU:
        sys.stdout.write("MISSED: token CPU cost\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
