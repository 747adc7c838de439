"""The client's side of TRANSPORT_GRPC_PACKED: each packed tensor checked on its own, a bad pack refused."""

from __future__ import annotations

import pytest
import torch

from tests.client.test_receive_arena import manifest
from weightserve import wire
from weightserve.client.assembly import FetchSession
from weightserve.errors import IntegrityError


def small() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "norm": torch.randn(7, generator=generator).to(torch.bfloat16),
        "empty": torch.empty(0, dtype=torch.float32),
        "bias": torch.randn(5, generator=generator),
        "ids": torch.arange(3, dtype=torch.int64),
    }


def raw(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def packed(state: dict[str, torch.Tensor], flip: int | None = None) -> bytes:
    """All of `state` in one packed message; `flip`: damage the first byte of that tensor."""
    datas = [raw(t) for t in state.values()]
    crcs = [wire.crc32c(d) for d in datas]
    if flip is not None:
        datas[flip] = bytes([datas[flip][0] ^ 1]) + datas[flip][1:]
    data = b"".join(datas)
    prefix = wire.encode_packed_prefix(
        indices=list(range(len(datas))), sizes=[len(d) for d in datas], crcs=crcs, crc=wire.crc32c(data)
    )
    return prefix + data


def test_a_packed_message_rebuilds_every_tensor_bit_for_bit() -> None:
    state = small()
    session = FetchSession(manifest(state), None, torch.device("cpu"))
    session.accept(packed(state))
    assert session.complete and session.stats.payload_bytes == sum(len(raw(t)) for t in state.values())
    got = session.state_dict()
    assert list(got) == list(state)
    assert all(got[k].dtype == state[k].dtype and got[k].equal(state[k]) for k in state)


def test_a_damaged_tensor_fails_alone_and_the_resume_point_is_its_first_byte() -> None:
    state = small()
    session = FetchSession(manifest(state), None, torch.device("cpu"))
    with pytest.raises(IntegrityError, match="'bias' failed its crc32c"):
        session.accept(packed(state, flip=2))
    assert session.resume_point() == ("bias", 0)  # norm and empty are done


def garbage_packing(message: bytes) -> bytes:
    """The message's data behind a `packing` field that does not parse (a truncated varint)."""
    data = wire.decode_chunk(message).data.tobytes()
    return b"\x3a\x03\xff\xff\xff" + b"\x7a" + wire._varint(len(data)) + data


@pytest.mark.parametrize(
    "damage",
    [garbage_packing, lambda m: m[:-1]],  # the second: data one byte short of the sizes
    ids=["not a Packing", "sizes past the data"],
)
def test_a_pack_that_does_not_describe_its_data_is_an_integrity_error(damage) -> None:  # type: ignore[no-untyped-def]
    state = small()
    session = FetchSession(manifest(state), None, torch.device("cpu"))
    message = packed(state)
    with pytest.raises(IntegrityError):
        session.accept(damage(message))
    assert session.resume_point() is None and not session.complete
