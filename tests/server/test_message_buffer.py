"""Messages built in place hold exactly what the fill wrote, on both code paths."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weightserve.server import message_buffer


@pytest.mark.parametrize("in_place", [True, False])
@given(prefix=st.binary(max_size=64), payload=st.binary(max_size=4096))
def test_build_message_holds_the_fill(in_place: bool, prefix: bytes, payload: bytes) -> None:
    def fill(head: memoryview, body: memoryview) -> None:
        head[:] = prefix
        body[:] = payload

    original = message_buffer._IN_PLACE
    message_buffer._IN_PLACE = in_place and original
    try:
        message = message_buffer.build_message(len(prefix), len(payload), fill)
    finally:
        message_buffer._IN_PLACE = original
    assert type(message) is bytes
    assert message == prefix + payload
    assert hash(message) == hash(prefix + payload)  # a normal, hashable bytes object


def test_a_failing_fill_returns_nothing() -> None:
    def fill(head: memoryview, body: memoryview) -> None:
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        message_buffer.build_message(4, 8, fill)
