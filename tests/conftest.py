"""Shared fixtures: small deterministic checkpoints and a real server on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from weightserve.config import ServerConfig
from weightserve.testing import BackgroundServer, LlamaShape, write_llama_checkpoint

TINY_LLAMA = LlamaShape(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=200,
)
"""GQA Llama small enough that a whole fetch takes milliseconds."""


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model root holding org/tiny-llama: two safetensors files, an index and configs."""
    root = tmp_path_factory.mktemp("models")
    write_llama_checkpoint(root / "org" / "tiny-llama", TINY_LLAMA, num_files=2)
    return root


ServeFn = Callable[..., BackgroundServer]


@pytest.fixture
def serve() -> Iterator[ServeFn]:
    """Start servers on 127.0.0.1:0 over the given roots; all are stopped after the test.

    `serve(root1, root2, **config_overrides)` returns a running BackgroundServer whose
    `.address` a client can dial.
    """
    started: list[BackgroundServer] = []

    def start(*roots: Path, **overrides: object) -> BackgroundServer:
        config = ServerConfig(model_roots=tuple(roots), listen="127.0.0.1:0", **overrides)  # type: ignore[arg-type]
        server = BackgroundServer(config).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
