"""Serving a model twice the memory budget keeps the server's RSS growth under the budget."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import psutil

from weightserve.client import WeightClient
from weightserve.testing import LlamaShape, write_llama_checkpoint

BUDGET = 32 * 1024 * 1024
SHAPE = LlamaShape(
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=8000,
)  # about 62 MB of bf16: twice the budget


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_rss_growth_stays_under_the_budget(tmp_path: Path) -> None:
    write_llama_checkpoint(tmp_path / "org" / "big", SHAPE, num_files=2)
    model_bytes = sum(p.stat().st_size for p in (tmp_path / "org" / "big").glob("*.safetensors"))
    assert model_bytes > 1.8 * BUDGET
    address = f"127.0.0.1:{_free_port()}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "weightserve.cli",
            "serve",
            "--model-root",
            str(tmp_path),
            "--listen",
            address,
            "--cache-memory",
            str(BUDGET),
            "--chunk-bytes",
            str(1 << 20),
            "--log-level",
            "WARNING",
            "--metrics-listen",
            "off",
        ],
    )
    try:
        server = psutil.Process(proc.pid)
        with WeightClient(address) as client:
            client.list_models()  # waits for the server (retries while it starts)
            before = server.memory_info().rss  # anonymous and file-backed resident pages
            peak = before
            done = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not done.wait(0.01):
                    peak = max(peak, server.memory_info().rss)

            sampler = threading.Thread(target=sample)
            sampler.start()
            try:
                for _ in range(2):  # a second pass finds half the model cached, reads the rest
                    state = client.fetch_state_dict("org/big")
                    assert sum(t.numel() * t.element_size() for t in state.values()) > BUDGET
                    del state
            finally:
                done.set()
                sampler.join()
            status = {m.name: m.cache for m in client.list_models()}["org/big"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    growth = peak - before
    assert status.resident_bytes <= BUDGET
    assert growth <= BUDGET, f"server RSS grew {growth / 2**20:.1f} MiB for a {BUDGET / 2**20:.0f} MiB budget"
