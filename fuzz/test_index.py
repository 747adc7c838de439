"""The index json readers: files_from_index, check_index (loaders) and names_from_index (storage)."""

from __future__ import annotations

from tests.loaders import fuzzing

from fuzz.campaign import Campaign


def test_index_json(campaign: Campaign) -> None:
    campaign("index-json", fuzzing.index_target, {"text": fuzzing.index_texts()})
