"""The torch reader (weights-only unpickler, zip directory, view checks) on mutated torch.save files."""

from __future__ import annotations

import pytest
from tests.loaders import fuzzing

from fuzz.campaign import Campaign


@pytest.mark.filterwarnings("ignore::UserWarning:torch")
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_mutated_files(campaign: Campaign, zip_format: bool) -> None:
    name = "torch-zip" if zip_format else "torch-legacy"
    campaign(name, fuzzing.torch_target, {"blob": fuzzing.torch_files(zip_format)})
