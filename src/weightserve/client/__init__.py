"""Client library: fetch a rank's state dict (sync or asyncio), files and model lists; drive expert rebalancing."""

from weightserve.client.aio import AsyncWeightClient
from weightserve.client.assembly import FetchStats
from weightserve.client.retry import RetryPolicy
from weightserve.client.sync import WeightClient

__all__ = ["AsyncWeightClient", "FetchStats", "RetryPolicy", "WeightClient"]
