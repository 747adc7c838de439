"""parse_header against hostile headers: every problem is a CorruptCheckpointError that names it.

The header is untrusted input, so besides the hand-written cases below, hypothesis
feeds it arbitrary bytes and arbitrary JSON: the only exception allowed out is
CorruptCheckpointError. Valid headers (random dtypes, shapes and tensor order) parse
back exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from weightserve.errors import CorruptCheckpointError
from weightserve.loaders.safetensors import MAX_HEADER_BYTES, HeaderEntry, parse_header
from weightserve.wire import DTYPE_SIZES

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def frame(header: bytes, data_len: int = 0) -> tuple[bytes, int]:
    """(prefix, file_size) of a file holding `header` followed by `data_len` data bytes."""
    return struct.pack("<Q", len(header)) + header, 8 + len(header) + data_len


def frame_json(header: Any, data_len: int) -> tuple[bytes, int]:
    return frame(json.dumps(header).encode(), data_len)


def entry(dtype: Any = "F32", shape: Any = (2,), offsets: Any = (0, 8)) -> dict[str, Any]:
    return {
        "dtype": dtype,
        "shape": list(shape) if isinstance(shape, tuple) else shape,
        "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets,
    }


def corrupt(prefix: bytes, file_size: int, match: str) -> CorruptCheckpointError:
    with pytest.raises(CorruptCheckpointError, match=match) as info:
        parse_header(prefix, file_size)
    return info.value


# ------------------------------------------------------------------ framing / length


@pytest.mark.fault("hostile safetensors header")
def test_header_length_over_the_100_mb_bound() -> None:
    prefix = struct.pack("<Q", MAX_HEADER_BYTES + 1)
    corrupt(prefix, 10 * MAX_HEADER_BYTES, r"header length 104857601 exceeds the 104857600-byte bound")


@pytest.mark.fault("hostile safetensors header")
def test_header_length_of_2_to_the_64_minus_1() -> None:
    corrupt(struct.pack("<Q", 2**64 - 1), 2**62, r"exceeds")


@pytest.mark.fault("hostile safetensors header")
def test_header_length_exactly_at_the_bound_is_only_limited_by_the_file() -> None:
    # At the bound the length is acceptable; the 16-byte file is what is wrong.
    corrupt(struct.pack("<Q", MAX_HEADER_BYTES), 16, r"runs past the end of a 16-byte file")


@pytest.mark.fault("hostile safetensors header")
def test_header_length_past_the_end_of_the_file() -> None:
    header = json.dumps({"t": entry()}).encode()
    prefix = struct.pack("<Q", len(header) + 100) + header
    corrupt(prefix, len(prefix), rf"header length {len(header) + 100} runs past the end")


@pytest.mark.fault("hostile safetensors header")
@pytest.mark.parametrize("size", [0, 1, 7])
def test_file_too_short_for_the_length_field(size: int) -> None:
    corrupt(b"\x00" * size, size, rf"file of {size} bytes is too short")


@pytest.mark.fault("hostile safetensors header")
def test_prefix_cut_short_before_the_header_ends() -> None:
    prefix, size = frame_json({"t": entry()}, 8)
    corrupt(prefix[:-5], size, r"cut short")


# ---------------------------------------------------------------------------- JSON


@pytest.mark.fault("hostile safetensors header")
@pytest.mark.parametrize(
    "header",
    [
        b"{not json",
        b"",
        b'{"t": ',
        b'{"t": {"dtype": "F32",}}',
        b"{" * 3 + b"}" * 2,
        b"\x00\x00\x00\x00",
    ],
)
def test_invalid_json(header: bytes) -> None:
    corrupt(*frame(header), match=r"not valid JSON")


@pytest.mark.fault("hostile safetensors header")
@pytest.mark.parametrize("header", [b'{"\xff\xfe": 1}', b'{"t": "\xc3\x28"}', b"\xed\xa0\x80", b"\x80{}"])
def test_invalid_utf8(header: bytes) -> None:
    corrupt(*frame(header), match=r"not valid JSON")


@pytest.mark.fault("hostile safetensors header")
def test_deeply_nested_json_is_refused_not_a_recursion_crash() -> None:
    corrupt(*frame(b"[" * 200_000 + b"]" * 200_000), match=r"not valid JSON")


@pytest.mark.fault("hostile safetensors header")
@pytest.mark.parametrize("header", ["[]", "[1, 2]", '"text"', "1", "null", "true", "1.5"])
def test_non_object_json(header: str) -> None:
    corrupt(*frame(header.encode()), match=r"not a JSON object")


@pytest.mark.fault("hostile safetensors header")
def test_integer_too_long_for_python_int_parsing() -> None:
    # CPython refuses to parse integers of more than 4300 digits with a plain
    # ValueError; a header holding one is corrupt, not an internal error.
    header = b'{"t": {"dtype": "F32", "shape": [' + b"1" * 5000 + b'], "data_offsets": [0, 4]}}'
    corrupt(*frame(header, 4), match=r"not valid JSON|shape|digits")


# -------------------------------------------------------------------------- entries


@pytest.mark.fault("hostile safetensors header")
@pytest.mark.parametrize("spec", ["F32", 3, None, [1, 2], True])
def test_entry_not_an_object(spec: Any) -> None:
    corrupt(*frame_json({"w": spec}, 0), match=r"tensor 'w': header entry is not an object")


@pytest.mark.fault("hostile safetensors header")
@pytest.mark.parametrize("dtype", ["F128", "f32", "float32", "", None, 4, 4.0, True])
def test_unknown_dtype(dtype: Any) -> None:
    corrupt(*frame_json({"w": entry(dtype=dtype)}, 8), match=r"tensor 'w': unknown dtype")


@pytest.mark.fault("hostile safetensors header")
@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}, []])
def test_unhashable_dtype_is_an_unknown_dtype(dtype: Any) -> None:
    corrupt(*frame_json({"w": entry(dtype=dtype)}, 8), match=r"tensor 'w': unknown dtype")


@pytest.mark.fault("hostile safetensors header")
def test_missing_dtype() -> None:
    spec = entry()
    del spec["dtype"]
    corrupt(*frame_json({"w": spec}, 8), match=r"tensor 'w': unknown dtype None")


@pytest.mark.fault("hostile safetensors header")
@pytest.mark.parametrize(
    "shape",
    [[-1], [2, -1], [2.0], [1.5], [True], [False, 2], ["2"], [None], [[2]], "2", 2, None, {"0": 2}],
)
def test_bad_shape(shape: Any) -> None:
    corrupt(
        *frame_json({"w": entry(shape=shape)}, 8),
        match=r"tensor 'w': shape .* is not a list of non-negative integers",
    )


@pytest.mark.fault("hostile safetensors header")
@pytest.mark.parametrize(
    "offsets",
    [[0], [0, 8, 8], [], "0,8", None, [0.0, 8.0], [0, 8.0], [True, 8], [0, "8"], {"begin": 0, "end": 8}],
)
def test_malformed_data_offsets(offsets: Any) -> None:
    corrupt(
        *frame_json({"w": entry(offsets=offsets)}, 8),
        match=r"tensor 'w': data_offsets .* is not \[begin, end\]",
    )


@pytest.mark.fault("hostile safetensors header")
def test_begin_after_end() -> None:
    corrupt(
        *frame_json({"w": entry(offsets=(8, 0))}, 8),
        match=r"tensor 'w': data_offsets \[8, 0\] are out of order",
    )


@pytest.mark.fault("hostile safetensors header")
def test_negative_begin() -> None:
    corrupt(*frame_json({"w": entry(offsets=(-8, 0), shape=(2,))}, 8), match=r"tensor 'w': data_offsets \[-8, 0\]")


@pytest.mark.fault("hostile safetensors header")
def test_end_past_the_data_section() -> None:
    corrupt(
        *frame_json({"w": entry(offsets=(0, 8))}, 4),
        match=r"tensor 'w': data_offsets end 8 is past the data section \(4 bytes\)",
    )


@pytest.mark.fault("hostile safetensors header")
def test_huge_end_offset() -> None:
    corrupt(*frame_json({"w": entry(offsets=(0, 2**70))}, 8), match=r"past the data section")


@pytest.mark.fault("hostile safetensors header")
@pytest.mark.parametrize(
    ("dtype", "shape", "offsets", "detail"),
    [
        ("F32", (3,), (0, 8), "shape \\[3\\] x F32 is 12 bytes but its range holds 8"),
        ("F16", (2,), (0, 8), "is 4 bytes but its range holds 8"),
        ("I64", (1, 2), (0, 8), "is 16 bytes"),
        ("U8", (0,), (0, 8), "is 0 bytes but its range holds 8"),
        ("F32", (), (0, 8), "is 4 bytes but its range holds 8"),
        ("F32", (2**40, 2**40), (0, 8), "its range holds 8"),
    ],
)
def test_shape_times_dtype_differs_from_the_byte_range(
    dtype: str, shape: tuple[int, ...], offsets: tuple[int, int], detail: str
) -> None:
    corrupt(*frame_json({"w": entry(dtype, shape, offsets)}, 8), match=rf"tensor 'w': .*{detail}")


@pytest.mark.fault("hostile safetensors header")
def test_overlapping_ranges() -> None:
    header = {"a": entry("F32", (2,), (0, 8)), "b": entry("F32", (2,), (4, 12))}
    corrupt(*frame_json(header, 12), match=r"tensor 'b': byte range overlaps the previous tensor")


@pytest.mark.fault("hostile safetensors header")
def test_identical_ranges_overlap() -> None:
    header = {"a": entry("F32", (2,), (0, 8)), "b": entry("F32", (2,), (0, 8))}
    corrupt(*frame_json(header, 8), match=r"overlaps the previous tensor")


@pytest.mark.fault("hostile safetensors header")
def test_empty_tensor_inside_another_overlaps() -> None:
    header = {"a": entry("F32", (2,), (0, 8)), "e": entry("F32", (0,), (4, 4))}
    corrupt(*frame_json(header, 8), match=r"tensor 'e': byte range overlaps")


@pytest.mark.fault("hostile safetensors header")
def test_hole_between_tensors() -> None:
    header = {"a": entry("F32", (2,), (0, 8)), "b": entry("F32", (2,), (12, 20))}
    corrupt(*frame_json(header, 20), match=r"tensor 'b': 4 unindexed bytes before it")


@pytest.mark.fault("hostile safetensors header")
def test_hole_before_the_first_tensor() -> None:
    corrupt(
        *frame_json({"a": entry("F32", (2,), (16, 24))}, 24),
        match=r"tensor 'a': 16 unindexed bytes before it",
    )


@pytest.mark.fault("hostile safetensors header")
def test_trailing_bytes_after_the_last_tensor() -> None:
    # The reference implementation refuses a data section longer than its tensors
    # (MetadataIncompleteBuffer): unindexed trailing bytes are a hole too.
    corrupt(*frame_json({"a": entry("F32", (2,), (0, 8))}, 12), match=r"unindexed|trailing|hole|4 bytes")


@pytest.mark.fault("hostile safetensors header")
def test_data_section_without_any_tensor() -> None:
    corrupt(*frame_json({}, 8), match=r"unindexed|trailing|hole|8 bytes")


@pytest.mark.fault("hostile safetensors header")
def test_duplicated_tensor_key() -> None:
    header = b'{"w": %s, "w": %s}' % (json.dumps(entry()).encode(), json.dumps(entry()).encode())
    corrupt(*frame(header, 8), match=r"header repeats the key 'w'")


@pytest.mark.fault("hostile safetensors header")
def test_duplicated_key_inside_an_entry() -> None:
    header = b'{"w": {"dtype": "F32", "dtype": "F16", "shape": [2], "data_offsets": [0, 8]}}'
    corrupt(*frame(header, 8), match=r"header repeats the key 'dtype'")


@pytest.mark.fault("hostile safetensors header")
def test_duplicated_metadata_key() -> None:
    header = b'{"__metadata__": {"a": "1"}, "__metadata__": {"a": "2"}}'
    corrupt(*frame(header), match=r"header repeats the key '__metadata__'")


@pytest.mark.fault("hostile safetensors header")
@pytest.mark.parametrize(
    "metadata",
    [
        ["a"],
        "text",
        7,
        {"a": 1},
        {"a": None},
        {"a": {"b": "c"}},
        {"a": ["b"]},
        {"a": "ok", "b": True},
    ],
)
def test_bad_metadata(metadata: Any) -> None:
    header = {"__metadata__": metadata, "w": entry()}
    corrupt(*frame_json(header, 8), match=r"__metadata__ must map strings to strings")


@pytest.mark.fault("hostile safetensors header")
@pytest.mark.parametrize("metadata", [[], "", 0, False, 0.0])
def test_falsy_but_wrong_metadata(metadata: Any) -> None:
    # An empty list or a zero is no more a string map than a non-empty one.
    header = {"__metadata__": metadata, "w": entry()}
    corrupt(*frame_json(header, 8), match=r"__metadata__ must map strings to strings")


def test_metadata_is_returned_and_not_a_tensor() -> None:
    header = {"__metadata__": {"format": "pt", "note": ""}, "w": entry()}
    entries, metadata = parse_header(*frame_json(header, 8))
    assert metadata == {"format": "pt", "note": ""}
    assert [e.name for e in entries] == ["w"]


@pytest.mark.fault("hostile safetensors header")
def test_error_names_the_tensor_even_among_many() -> None:
    header = {f"ok.{i}": entry("U8", (1,), (i, i + 1)) for i in range(5)}
    header["model.layers.3.bad"] = entry("NOPE", (1,), (5, 6))
    corrupt(*frame_json(header, 6), match=r"tensor 'model.layers.3.bad': unknown dtype 'NOPE'")


# -------------------------------------------------------------------- fuzzing: bytes


@pytest.mark.fault("fuzzed safetensors header (arbitrary bytes or JSON)")
@FUZZ
@given(blob=st.binary(max_size=256), extra=st.integers(min_value=-16, max_value=4096))
def test_arbitrary_bytes_raise_only_corrupt_checkpoint_error(blob: bytes, extra: int) -> None:
    try:
        entries, metadata = parse_header(blob, max(0, len(blob) + extra))
    except CorruptCheckpointError as e:
        assert str(e)
    else:
        assert isinstance(metadata, dict)
        assert all(isinstance(e, HeaderEntry) for e in entries)


@pytest.mark.fault("fuzzed safetensors header (arbitrary bytes or JSON)")
@FUZZ
@given(body=st.binary(max_size=256), data_len=st.integers(min_value=0, max_value=64))
def test_arbitrary_header_bodies_raise_only_corrupt_checkpoint_error(body: bytes, data_len: int) -> None:
    with contextlib.suppress(CorruptCheckpointError):
        parse_header(*frame(body, data_len))


# --------------------------------------------------------------------- fuzzing: JSON

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
plausible_dtype = st.sampled_from(sorted(DTYPE_SIZES)) | json_values
plausible_dims = st.lists(st.integers(min_value=-2, max_value=6) | json_values, max_size=4) | json_values
plausible_offsets = st.lists(st.integers(min_value=-4, max_value=300), min_size=0, max_size=3) | json_values
plausible_entry = (
    st.fixed_dictionaries(
        {},
        optional={"dtype": plausible_dtype, "shape": plausible_dims, "data_offsets": plausible_offsets},
    )
    | json_values
)
hostile_header = (
    st.dictionaries(
        st.sampled_from(["__metadata__", "a", "b", "c"]) | st.text(max_size=6),
        plausible_entry,
        max_size=5,
    )
    | json_values
)


@pytest.mark.fault("fuzzed safetensors header (arbitrary bytes or JSON)")
@FUZZ
@given(header=hostile_header, data_len=st.integers(min_value=0, max_value=300))
def test_hostile_json_headers_raise_only_corrupt_checkpoint_error(header: Any, data_len: int) -> None:
    try:
        entries, metadata = parse_header(*frame_json(header, data_len))
    except CorruptCheckpointError:
        return
    # Whatever was accepted must be internally consistent.
    assert isinstance(header, dict)
    cursor = 8 + len(json.dumps(header).encode())
    for e in entries:
        assert e.begin == cursor
        assert e.end - e.begin == math.prod(e.shape) * DTYPE_SIZES[e.dtype]
        cursor = e.end
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())


# ---------------------------------------------------------------- valid round trips

tensor_specs = st.lists(
    st.tuples(
        st.sampled_from(sorted(DTYPE_SIZES)),
        st.lists(st.integers(min_value=0, max_value=5), max_size=4).map(tuple),
    ),
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(
    specs=tensor_specs,
    order=st.randoms(use_true_random=False),
    metadata=st.none()
    | st.dictionaries(st.text(max_size=5).filter(lambda k: k != ""), st.text(max_size=5), max_size=3),
    pad=st.integers(min_value=0, max_value=7),
)
def test_valid_random_headers_parse_back_exactly(
    specs: list[tuple[str, tuple[int, ...]]], order: Any, metadata: dict[str, str] | None, pad: int
) -> None:
    names = [f"layer.{i}.weight" for i in range(len(specs))]
    layout = list(range(len(specs)))
    order.shuffle(layout)  # data order differs from header (key) order
    offsets: dict[int, tuple[int, int]] = {}
    cursor = 0
    for i in layout:
        dtype, shape = specs[i]
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        offsets[i] = (cursor, cursor + nbytes)
        cursor += nbytes
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    for i, (dtype, shape) in enumerate(specs):
        header[names[i]] = entry(dtype, shape, offsets[i])
    raw = json.dumps(header).encode() + b" " * pad  # writers pad the header with spaces
    prefix, size = frame(raw, cursor)

    entries, parsed_metadata = parse_header(prefix, size)

    data_start = 8 + len(raw)
    assert parsed_metadata == (metadata or {})
    expected = {
        names[i]: HeaderEntry(names[i], dtype, shape, data_start + offsets[i][0], data_start + offsets[i][1])
        for i, (dtype, shape) in enumerate(specs)
    }
    assert {e.name: e for e in entries} == expected
    assert len(entries) == len(specs)
    assert [(e.begin, e.end) for e in entries] == sorted((e.begin, e.end) for e in entries)


def test_header_of_a_file_written_by_the_reference_writer(tmp_path: Path) -> None:
    tensors = {
        "embed": torch.arange(24, dtype=torch.float32).reshape(4, 6).to(torch.bfloat16),
        "scale": torch.arange(3, dtype=torch.float64),
        "ids": torch.arange(10, dtype=torch.int64).reshape(2, 5),
        "empty": torch.arange(0, dtype=torch.float16).reshape(0, 3),
        "scalar": torch.tensor(7, dtype=torch.int32),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), {"format": "pt"})
    blob = path.read_bytes()

    entries, metadata = parse_header(blob, len(blob))

    assert metadata == {"format": "pt"}
    by_name = {e.name: e for e in entries}
    assert set(by_name) == set(tensors)
    for name, tensor in tensors.items():
        e = by_name[name]
        assert e.shape == tuple(tensor.shape)
        assert e.end - e.begin == tensor.numel() * tensor.element_size()
        assert blob[e.begin : e.end] == tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
    assert max(e.end for e in entries) == len(blob)
