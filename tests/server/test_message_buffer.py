"""Messages built in place hold exactly what the fill wrote, on both code paths."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from weightserve.client import WeightClient
from weightserve.server import message_buffer


@pytest.mark.parametrize("in_place", [True, False])
@given(prefix=st.binary(max_size=64), payload=st.binary(max_size=4096))
def test_build_message_holds_the_fill(in_place: bool, prefix: bytes, payload: bytes) -> None:
    def fill(head: memoryview, body: memoryview) -> None:
        head[:] = prefix
        body[:] = payload

    message = message_buffer.build_message(len(prefix), len(payload), fill, in_place=in_place)
    assert type(message) is bytes
    assert message == prefix + payload
    assert hash(message) == hash(prefix + payload)  # a normal, hashable bytes object


def test_a_failing_fill_returns_nothing() -> None:
    def fill(head: memoryview, body: memoryview) -> None:
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        message_buffer.build_message(4, 8, fill)


@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("cache_memory", [0, 64 << 20])
def test_the_data_plane_serves_the_same_bits_both_ways(model_root, serve, in_place: bool, cache_memory: int) -> None:  # type: ignore[no-untyped-def]
    server = serve(model_root, in_place_messages=in_place, cache_memory=cache_memory, chunk_bytes=4096)
    with WeightClient(server.address) as client:
        state = client.fetch_state_dict("org/tiny-llama")
        again = client.fetch_state_dict("org/tiny-llama", rank=1, world_size=2)
    reference = {}
    for path in sorted((model_root / "org" / "tiny-llama").glob("*.safetensors")):
        reference |= load_file(path)
    assert state.keys() == reference.keys()
    for name, tensor in reference.items():
        assert state[name].view(-1).view(torch.uint8).equal(tensor.view(-1).view(torch.uint8)), name
    assert again  # a sliced plan (strided reads) through the same path
