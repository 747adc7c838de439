"""The collector is held off only while a fetch builds its objects: it runs again afterwards, even after an
error, and a caller that had turned it off keeps it off."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
import torch

from tests.client.test_receive_arena import manifest
from weightserve.client.assembly import FetchSession
from weightserve.client.gc_pause import gc_paused


@pytest.fixture
def collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_the_collector_runs_again_after_the_block_and_after_an_error(collector_on: None) -> None:
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("mid-build")
    assert gc.isenabled()


def test_a_caller_that_turned_it_off_keeps_it_off(collector_on: None) -> None:
    gc.disable()
    with gc_paused():
        pass
    assert not gc.isenabled()


def test_a_fetch_session_leaves_the_collector_as_it_found_it(collector_on: None) -> None:
    state = {f"t.{n}": torch.full((4,), n, dtype=torch.float32) for n in range(50)}
    session = FetchSession(manifest(state), None, torch.device("cpu"))
    assert gc.isenabled()
    session.state_dict()
    assert gc.isenabled()
