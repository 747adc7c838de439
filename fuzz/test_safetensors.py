"""The safetensors header parser: arbitrary bytes, hostile JSON, and mutated real files.

The first two reuse the properties of tests/loaders/test_safetensors_header.py, with
larger inputs and for longer; the third is tests/loaders/fuzzing.py's file target.
"""

from __future__ import annotations

from hypothesis import strategies as st
from tests.loaders import fuzzing
from tests.loaders import test_safetensors_header as header

from fuzz.campaign import Campaign


def test_arbitrary_bytes(campaign: Campaign) -> None:
    campaign(
        "safetensors-bytes",
        header.test_arbitrary_bytes_raise_only_corrupt_checkpoint_error.hypothesis.inner_test,
        {"blob": st.binary(max_size=4096), "extra": st.integers(min_value=-64, max_value=1 << 20)},
    )


def test_hostile_json_headers(campaign: Campaign) -> None:
    campaign(
        "safetensors-json",
        header.test_hostile_json_headers_raise_only_corrupt_checkpoint_error.hypothesis.inner_test,
        {"header": header.hostile_header, "data_len": st.integers(min_value=0, max_value=4096)},
    )


def test_mutated_files(campaign: Campaign) -> None:
    campaign("safetensors-files", fuzzing.safetensors_target, {"blob": fuzzing.safetensors_files()})
