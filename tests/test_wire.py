"""The shared wire helpers: crc32c combine, the hand-written chunk codec, manifest ids, dtypes.

The chunk codec is checked against the stock generated protobuf classes in both
directions: what we encode parses with TensorChunk.FromString, and what stock
protobuf serializes (unknown fields included) parses with decode_chunk.
"""

from __future__ import annotations

import struct

import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from weightserve import wire
from weightserve.errors import CorruptCheckpointError, IntegrityError
from weightserve.v1 import weightserve_pb2 as pb

U32 = st.integers(min_value=0, max_value=2**32 - 1)
U64 = st.integers(min_value=0, max_value=2**64 - 1)

# ------------------------------------------------------------------------- crc32c


def test_crc32c_known_vectors() -> None:
    assert wire.crc32c(b"") == 0
    assert wire.crc32c(b"123456789") == 0xE3069283  # the standard check value
    assert wire.crc32c(b"\x00" * 32) == 0x8A9136AA  # RFC 3720 B.4
    assert wire.crc32c(b"56789", wire.crc32c(b"1234")) == 0xE3069283


@settings(max_examples=200, deadline=None)
@given(a=st.binary(max_size=300), b=st.binary(max_size=300))
def test_crc32c_combine_equals_crc_of_concatenation(a: bytes, b: bytes) -> None:
    assert wire.crc32c_combine(wire.crc32c(a), wire.crc32c(b), len(b)) == wire.crc32c(a + b)


@settings(max_examples=50, deadline=None)
@given(a=st.binary(max_size=64), n=st.integers(min_value=0, max_value=1 << 20), seed=st.integers(0, 255))
def test_crc32c_combine_over_long_second_parts(a: bytes, n: int, seed: int) -> None:
    b = bytes([seed]) * n
    assert wire.crc32c_combine(wire.crc32c(a), wire.crc32c(b), len(b)) == wire.crc32c(a + b)


@pytest.mark.parametrize(("a", "b"), [(b"", b""), (b"abc", b""), (b"", b"abc")])
def test_crc32c_combine_with_empty_parts(a: bytes, b: bytes) -> None:
    assert wire.crc32c_combine(wire.crc32c(a), wire.crc32c(b), len(b)) == wire.crc32c(a + b)


@settings(max_examples=100, deadline=None)
@given(parts=st.lists(st.binary(max_size=100), max_size=8))
def test_crc32c_combine_folds_a_chunked_stream(parts: list[bytes]) -> None:
    running = 0
    for part in parts:
        running = wire.crc32c_combine(running, wire.crc32c(part), len(part))
    assert running == wire.crc32c(b"".join(parts))


# ----------------------------------------------------------------- chunk encoding

headers = st.builds(
    pb.TensorHeader,
    name=st.text(max_size=40),
    dtype=st.sampled_from(sorted(wire.DTYPE_SIZES)),
    shape=st.lists(st.integers(min_value=0, max_value=2**40), max_size=5),
    nbytes=U64,
)


@settings(max_examples=200, deadline=None)
@given(
    header=st.none() | headers,
    tensor_index=U32,
    offset=U64,
    crc=U32,
    last=st.booleans(),
    tensor_crc=U32,
    data=st.binary(max_size=2000),
)
def test_encoded_chunks_parse_with_stock_protobuf(
    *,
    header: pb.TensorHeader | None,
    tensor_index: int,
    offset: int,
    crc: int,
    last: bool,
    tensor_crc: int,
    data: bytes,
) -> None:
    header_bytes = header.SerializeToString() if header is not None else None
    message = (
        wire.encode_chunk_prefix(
            header=header_bytes,
            tensor_index=tensor_index,
            offset=offset,
            crc=crc,
            last=last,
            tensor_crc=tensor_crc,
            data_len=len(data),
        )
        + data
    )

    parsed = pb.TensorChunk.FromString(message)

    assert parsed.HasField("header") == (header is not None)
    if header is not None:
        assert parsed.header == header
    assert parsed.tensor_index == tensor_index
    assert parsed.offset == offset
    assert parsed.crc32c == crc
    assert parsed.last == last
    assert parsed.tensor_crc32c == (tensor_crc if last else 0)
    assert parsed.data == data
    # And our own parser agrees, with the payload as a view (no copy).
    view = wire.decode_chunk(message)
    assert (view.header, view.tensor_index, view.offset, view.crc, view.last) == (
        header_bytes,
        tensor_index,
        offset,
        crc,
        last,
    )
    assert view.tensor_crc == (tensor_crc if last else 0)
    assert bytes(view.data) == data
    assert isinstance(view.data, memoryview)


@settings(max_examples=200, deadline=None)
@given(
    name=st.text(max_size=60),
    dtype=st.sampled_from(sorted(wire.DTYPE_SIZES)),
    shape=st.lists(st.integers(min_value=0, max_value=2**62), max_size=6).map(tuple),
    nbytes=U64,
)
def test_hand_written_tensor_header_parses_with_stock_protobuf(
    name: str, dtype: str, shape: tuple[int, ...], nbytes: int
) -> None:
    encoded = wire.encode_tensor_header(name, dtype, shape, nbytes)
    expected = pb.TensorHeader(name=name, dtype=dtype, shape=shape, nbytes=nbytes)
    assert pb.TensorHeader.FromString(encoded) == expected


def test_payload_is_the_last_field_on_the_wire() -> None:
    data = b"payload!"
    prefix = wire.encode_chunk_prefix(
        header=b"\x0a\x01x", tensor_index=3, offset=9, crc=1, last=True, tensor_crc=2, data_len=len(data)
    )
    assert prefix.endswith(b"\x7a" + bytes([len(data)]))  # field 15, length-delimited, then the payload


def chunk_messages() -> st.SearchStrategy[pb.TensorChunk]:
    return st.builds(
        pb.TensorChunk,
        header=st.none() | headers,
        tensor_index=U32,
        offset=U64,
        crc32c=U32,
        last=st.booleans(),
        tensor_crc32c=U32,
        data=st.binary(max_size=300),
    )


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# Unknown fields of every wire type a proto3 writer emits (numbers not in TensorChunk).
unknown_fields = st.lists(
    st.one_of(
        st.builds(lambda n, v: varint(n << 3 | 0) + varint(v), st.integers(7, 14), U64),
        st.builds(lambda n, v: varint(n << 3 | 1) + struct.pack("<Q", v), st.integers(7, 14), U64),
        st.builds(
            lambda n, v: varint(n << 3 | 2) + varint(len(v)) + v,
            st.integers(16, 2000),
            st.binary(max_size=20),
        ),
        st.builds(lambda n, v: varint(n << 3 | 5) + struct.pack("<I", v), st.integers(7, 14), U32),
    ),
    max_size=4,
)


def assert_decoded_equals(view: wire.ChunkView, chunk: pb.TensorChunk) -> None:
    assert (view.header is not None) == chunk.HasField("header")
    if view.header is not None:
        assert pb.TensorHeader.FromString(view.header) == chunk.header
    assert view.tensor_index == chunk.tensor_index
    assert view.offset == chunk.offset
    assert view.crc == chunk.crc32c
    assert view.last == chunk.last
    assert view.tensor_crc == chunk.tensor_crc32c
    assert bytes(view.data) == chunk.data


@settings(max_examples=200, deadline=None)
@given(chunk=chunk_messages(), before=unknown_fields, after=unknown_fields)
def test_decode_chunk_parses_stock_serialized_messages_with_unknown_fields(
    chunk: pb.TensorChunk, before: list[bytes], after: list[bytes]
) -> None:
    message = b"".join(before) + chunk.SerializeToString() + b"".join(after)
    assert_decoded_equals(wire.decode_chunk(message), pb.TensorChunk.FromString(message))
    assert_decoded_equals(wire.decode_chunk(message), chunk)


def test_decode_chunk_accepts_explicit_defaults_and_any_field_order() -> None:
    data = b"abc"
    message = (
        b"\x7a"
        + varint(len(data))
        + data  # payload first
        + b"\x10\x00"  # tensor_index 0 written explicitly
        + b"\x28\x00"  # last = false written explicitly
        + b"\x25"
        + struct.pack("<I", wire.crc32c(data))
        + b"\x18"
        + varint(2**40)
    )
    view = wire.decode_chunk(message)
    assert (view.tensor_index, view.offset, view.last, view.crc, bytes(view.data)) == (
        0,
        2**40,
        False,
        wire.crc32c(data),
        data,
    )
    assert_decoded_equals(view, pb.TensorChunk.FromString(message))


@settings(max_examples=200, deadline=None)
@given(chunk=chunk_messages(), extra=unknown_fields, cut=st.integers(min_value=0, max_value=10_000))
def test_truncated_messages_fail_exactly_when_stock_protobuf_does(
    chunk: pb.TensorChunk, extra: list[bytes], cut: int
) -> None:
    full = chunk.SerializeToString() + b"".join(extra)
    message = full[: cut % (len(full) + 1)]
    try:
        expected = pb.TensorChunk.FromString(message)
    except DecodeError:
        with pytest.raises(IntegrityError):
            wire.decode_chunk(message)
    else:
        assert_decoded_equals(wire.decode_chunk(message), expected)


def test_truncated_unknown_fixed64_is_an_integrity_error() -> None:
    chunk = pb.TensorChunk(tensor_index=1, crc32c=5, data=b"xy").SerializeToString()
    message = chunk + varint(7 << 3 | 1) + b"\x01\x02\x03"  # fixed64 with 3 of its 8 bytes
    with pytest.raises(DecodeError):
        pb.TensorChunk.FromString(message)
    with pytest.raises(IntegrityError):
        wire.decode_chunk(message)


@pytest.mark.parametrize(
    "message",
    [
        b"\x80",  # varint key with no end
        b"\xff" * 11,  # varint longer than 10 bytes
        b"\x10",  # tensor_index key, no value
        b"\x25\x01\x02",  # fixed32 crc cut short
        b"\x7a\x05abc",  # payload shorter than its length
        b"\x7a\xff\xff\xff\xff\x0f",  # payload length of 4 GiB in a 6-byte message
        b"\x0a\x10\x0a",  # header shorter than its length
        b"\x0b",  # start-group (wire type 3)
        b"\x0e",  # wire type 6 does not exist
        b"\x0f",  # wire type 7 does not exist
    ],
)
def test_decode_chunk_garbage_raises_integrity_error(message: bytes) -> None:
    with pytest.raises(IntegrityError):
        wire.decode_chunk(message)


@settings(max_examples=300, deadline=None)
@given(message=st.binary(max_size=200))
def test_decode_chunk_on_arbitrary_bytes_raises_only_integrity_error(message: bytes) -> None:
    try:
        view = wire.decode_chunk(message)
    except IntegrityError:
        return
    assert isinstance(view.data, memoryview)
    assert len(view.data) <= len(message)


def test_decode_chunk_accepts_bytearray_and_memoryview() -> None:
    message = pb.TensorChunk(tensor_index=2, data=b"hello").SerializeToString()
    for form in (bytearray(message), memoryview(message)):
        view = wire.decode_chunk(form)
        assert view.tensor_index == 2 and bytes(view.data) == b"hello"


# ---------------------------------------------------------------------- manifest id

BASE_PARAMS = {"model": "org/m", "format": "safetensors", "rank": 0, "world_size": 1, "layout": "checkpoint"}


def test_manifest_id_is_stable() -> None:
    first = wire.manifest_id("local-abc", dict(BASE_PARAMS))
    assert first == wire.manifest_id("local-abc", dict(BASE_PARAMS))
    assert first == wire.manifest_id("local-abc", dict(reversed(list(BASE_PARAMS.items()))))  # key order
    assert len(first) == 32 and int(first, 16) >= 0


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("model", "org/n"),
        ("format", "torch"),
        ("rank", 1),
        ("world_size", 2),
        ("layout", "vllm"),
        ("extra", 0),
    ],
)
def test_manifest_id_is_sensitive_to_every_plan_parameter(key: str, value: object) -> None:
    changed = {**BASE_PARAMS, key: value}
    assert wire.manifest_id("local-abc", changed) != wire.manifest_id("local-abc", BASE_PARAMS)


def test_manifest_id_is_sensitive_to_the_revision() -> None:
    assert wire.manifest_id("local-abc", BASE_PARAMS) != wire.manifest_id("local-abd", BASE_PARAMS)


def test_manifest_id_is_sensitive_to_the_wire_version(monkeypatch: pytest.MonkeyPatch) -> None:
    before = wire.manifest_id("local-abc", BASE_PARAMS)
    monkeypatch.setattr(wire, "WIRE_VERSION", wire.WIRE_VERSION + 1)
    assert wire.manifest_id("local-abc", BASE_PARAMS) != before


@settings(max_examples=100, deadline=None)
@given(rev_a=st.text(max_size=10), rev_b=st.text(max_size=10), rank_a=st.integers(0, 8), rank_b=st.integers(0, 8))
def test_manifest_id_differs_whenever_its_inputs_do(rev_a: str, rev_b: str, rank_a: int, rank_b: int) -> None:
    a = wire.manifest_id(rev_a, {**BASE_PARAMS, "rank": rank_a})
    b = wire.manifest_id(rev_b, {**BASE_PARAMS, "rank": rank_b})
    assert (a == b) == ((rev_a, rank_a) == (rev_b, rank_b))


# -------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("name", sorted(wire.DTYPE_SIZES))
def test_dtype_names_round_trip_through_torch(name: str) -> None:
    try:
        dtype = wire.torch_dtype(name)
    except CorruptCheckpointError:
        pytest.skip(f"torch {torch.__version__} has no dtype for {name}")
    assert wire.dtype_name(dtype) == name
    assert torch.empty((), dtype=dtype).element_size() == wire.DTYPE_SIZES[name]


def test_unknown_dtype_names() -> None:
    with pytest.raises(CorruptCheckpointError, match=r"dtype 'F128' is not supported"):
        wire.torch_dtype("F128")
    with pytest.raises(CorruptCheckpointError, match=r"has no safetensors name"):
        wire.dtype_name(torch.quint8)
