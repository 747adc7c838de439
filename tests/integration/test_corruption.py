"""Bytes flipped on the wire are caught by the chunk checksums, never returned.

Cleartext HTTP/2 carries gRPC messages as they are, and gRPC has no checksum of its
own, so a byte flipped inside a DATA frame's payload reaches the client intact as
far as gRPC can tell. The Corruptor flips one byte in the middle of a large message
(deep inside a chunk's tensor bytes); only weightserve's crc32c can notice.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from tests.integration.faultkit import MID_MODEL, Corruptor, FaultProxy, assert_bit_identical, load_checkpoint
from weightserve.client import WeightClient
from weightserve.client.retry import RetryPolicy
from weightserve.errors import FetchError
from weightserve.testing import BackgroundServer

ServeFn = Callable[..., BackgroundServer]
CHUNK = 65536
LARGE = CHUNK // 2
"""Messages at least this long carry a large payload: their middle byte is tensor data."""

pytestmark = pytest.mark.timeout(60)


@pytest.mark.fault("byte flipped in flight")
def test_one_flipped_byte_is_refetched(mid_root: Path, serve: ServeFn, proxy: Callable[..., FaultProxy]) -> None:
    server = serve(mid_root, chunk_bytes=CHUNK)
    corruptor = Corruptor.once(after=30, min_length=LARGE)
    link = proxy(server.server.port, corruptor=corruptor)
    with WeightClient(link.address) as client:
        state = client.fetch_state_dict(MID_MODEL)
        stats = client.last_stats

    assert corruptor.flips == 1, f"the corruptor saw {corruptor.messages} messages and flipped none"
    assert stats is not None
    assert stats.integrity_retries == 1, stats
    assert_bit_identical(state, load_checkpoint(mid_root / MID_MODEL))


@pytest.mark.fault("every stream corrupted in flight")
def test_corruption_on_every_stream_is_data_loss(
    mid_root: Path, serve: ServeFn, proxy: Callable[..., FaultProxy]
) -> None:
    server = serve(mid_root, chunk_bytes=CHUNK)
    corruptor = Corruptor.every(min_length=LARGE)
    link = proxy(server.server.port, corruptor=corruptor)
    policy = RetryPolicy()
    with WeightClient(link.address, retry=policy) as client:
        with pytest.raises(FetchError) as caught:
            client.fetch_state_dict(MID_MODEL)
        stats = client.last_stats

    assert caught.value.code() == grpc.StatusCode.DATA_LOSS, caught.value
    assert stats is not None
    assert stats.integrity_retries == policy.integrity_retries + 1, stats
    assert stats.attempts == policy.integrity_retries + 1, stats
    assert corruptor.flips >= stats.attempts
