"""Fixtures the client tests share: a server over the test models with small chunks, and a client of it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from weightserve import WeightClient


@pytest.fixture
def address(model_root: Path, serve) -> str:  # type: ignore[no-untyped-def]
    """A server over the session's test models, 4 KiB chunks so every tensor takes several."""
    return serve(model_root, chunk_bytes=4096).address


@pytest.fixture
def client(address: str) -> Iterator[WeightClient]:
    with WeightClient(address) as c:
        yield c
