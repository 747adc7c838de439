"""The GGUF reader (the gguf package's parser and our records) on mutated small GGUF files."""

from __future__ import annotations

import pytest
from tests.loaders import fuzzing

from fuzz.campaign import Campaign


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the reader's offset sums wrap
def test_mutated_files(campaign: Campaign) -> None:
    campaign("gguf-files", fuzzing.gguf_target, {"blob": fuzzing.gguf_files()})
