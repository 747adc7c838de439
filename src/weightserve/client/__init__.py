"""Client library: fetch a rank's state dict (sync or asyncio), files and model lists; drive expert rebalancing.

The clients load torch on first use, so `weightserve.client.security` (channel
credentials and tokens) can be imported alone, as the `weightserve health` probe does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from weightserve.client.aio import AsyncWeightClient
    from weightserve.client.assembly import FetchStats
    from weightserve.client.retry import RetryPolicy
    from weightserve.client.sync import WeightClient

_WHERE = {
    "AsyncWeightClient": "weightserve.client.aio",
    "FetchStats": "weightserve.client.assembly",
    "RetryPolicy": "weightserve.client.retry",
    "WeightClient": "weightserve.client.sync",
}

__all__ = ["AsyncWeightClient", "FetchStats", "RetryPolicy", "WeightClient"]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'weightserve.client' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
