"""The fuzz targets of tests/loaders/fuzzing.py, a few hundred examples each.

`make fuzz` runs the same targets for minutes under a memory cap; these keep CI on them.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.loaders import fuzzing

SHORT = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def short(target: Callable[[bytes], None], strategy: st.SearchStrategy[bytes]) -> None:
    SHORT(given(strategy)(target))()


def test_safetensors_files() -> None:
    short(fuzzing.safetensors_target, fuzzing.safetensors_files())


def test_gguf_files() -> None:
    short(fuzzing.gguf_target, fuzzing.gguf_files())


@pytest.mark.filterwarnings("ignore::UserWarning:torch")
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_files(zip_format: bool) -> None:
    short(fuzzing.torch_target, fuzzing.torch_files(zip_format))


def test_index_json() -> None:
    short(fuzzing.index_target, fuzzing.index_texts())


def test_the_seeds_parse() -> None:
    # A mutation that changes nothing must pass: the seeds themselves are valid files.
    fuzzing.safetensors_target(fuzzing.safetensors_seed())
    fuzzing.gguf_target(fuzzing.gguf_seed())
    fuzzing.torch_target(fuzzing.torch_seed(True))
    fuzzing.torch_target(fuzzing.torch_seed(False))
    fuzzing.index_target(fuzzing.index_seed())
