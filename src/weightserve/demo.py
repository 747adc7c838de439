"""`weightserve demo`: generate a tiny Llama, serve it, fetch it, check every bit."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from weightserve.atomic import atomic_write_text
from weightserve.client import WeightClient
from weightserve.config import ServerConfig
from weightserve.testing import BackgroundServer, LlamaShape, write_llama_checkpoint

DEMO_MODEL = "demo/tiny-llama"
_READY = ".weightserve-demo-v1"


def demo_root() -> Path:
    """Where the demo checkpoint is cached ($WEIGHTSERVE_DEMO_DIR, else ~/.cache/weightserve/demo)."""
    env = os.environ.get("WEIGHTSERVE_DEMO_DIR")
    return Path(env) if env else Path.home() / ".cache" / "weightserve" / "demo"


def ensure_demo_checkpoint(root: Path, shape: LlamaShape | None = None) -> Path:
    """Generate the checkpoint on first run; later runs reuse it (the marker is written last)."""
    model_dir = root / DEMO_MODEL
    if not (model_dir / _READY).is_file():
        write_llama_checkpoint(model_dir, shape or LlamaShape(), num_files=2)
        atomic_write_text(model_dir / _READY, "complete\n")
    return model_dir


@dataclass(frozen=True)
class DemoResult:
    model: str
    tensors: int
    nbytes: int
    seconds: float
    verified: bool

    def table(self) -> str:
        rows = [
            ("model", self.model),
            ("tensors", str(self.tensors)),
            ("bytes", f"{self.nbytes:,}"),
            ("seconds", f"{self.seconds:.2f}"),
            ("GB/s", f"{self.nbytes / self.seconds / 1e9:.2f}"),
            ("verified", "yes (bit-for-bit vs local safetensors load)" if self.verified else "NO: MISMATCH"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaNs and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def run_demo(root: Path | None = None, shape: LlamaShape | None = None) -> DemoResult:
    """Serve the demo checkpoint on a free loopback port, fetch it, verify it.

    `shape` (default: a ~300 MB Llama) lets a test run the same path on a tiny model.
    """
    root = root or demo_root()
    model_dir = ensure_demo_checkpoint(root, shape)
    config = ServerConfig(model_roots=(root,), listen="127.0.0.1:0")
    with BackgroundServer(config) as server, WeightClient(server.address) as client:
        started = time.perf_counter()
        state = client.fetch_state_dict(DEMO_MODEL)
        seconds = time.perf_counter() - started
    reference: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        reference |= load_file(path)
    verified = state.keys() == reference.keys() and all(bitwise_equal(state[k], reference[k]) for k in reference)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    return DemoResult(DEMO_MODEL, len(state), nbytes, seconds, verified)


def main() -> int:
    """Run the demo and print its table; non-zero exit if anything differs."""
    try:
        result = run_demo()
    except OSError as e:  # a read-only home: fall back to a temp dir
        sys.stderr.write(f"demo cache unavailable ({e}); using a temporary directory\n")
        with tempfile.TemporaryDirectory() as tmp:
            result = run_demo(Path(tmp))
    sys.stdout.write(result.table() + "\n")
    return 0 if result.verified else 1
