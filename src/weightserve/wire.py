"""What client and server share: dtype names, chunk checksums and the chunk codec.

A TensorChunk is written by hand on the server (header fields first, payload last)
so the payload is copied once into the outgoing message instead of twice through a
protobuf object, and parsed by hand on the client so the payload is a memoryview into
the received bytes. Both produce and accept ordinary protobuf: a stock
`TensorChunk.FromString` parses every message, and the client parser skips fields it
does not know. docs/wire.md is the prose version of this module.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import crc32c as _crc32c

from weightserve.errors import CorruptCheckpointError, IntegrityError

if TYPE_CHECKING:
    import torch

WIRE_VERSION = 1
MAX_CHUNK_BYTES = 4 * 1024 * 1024
"""Largest TensorChunk.data; chunks never span two tensors."""

# Safetensors dtype names -> bytes per element. Every name here is served when the
# installed torch has the dtype (see torch_dtype()).
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
    "C64": 8,
}

_TORCH_NAMES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "U16": "uint16",
    "I16": "int16",
    "F16": "float16",
    "BF16": "bfloat16",
    "U32": "uint32",
    "I32": "int32",
    "F32": "float32",
    "U64": "uint64",
    "I64": "int64",
    "F64": "float64",
    "C64": "complex64",
}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a safetensors dtype name.

    Raises:
        CorruptCheckpointError: the name is unknown or this torch lacks the dtype.
    """
    import torch

    attr = _TORCH_NAMES.get(name)
    dtype = getattr(torch, attr, None) if attr else None
    if dtype is None:
        raise CorruptCheckpointError(f"dtype {name!r} is not supported by torch {torch.__version__}")
    return dtype  # type: ignore[no-any-return]


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (inverse of torch_dtype)."""
    for name, attr in _TORCH_NAMES.items():
        if str(dtype) == f"torch.{attr}":
            return name
    raise CorruptCheckpointError(f"torch dtype {dtype} has no safetensors name")


# ---------------------------------------------------------------------------- crc32c


def crc32c(data: Any, value: int = 0) -> int:
    """crc32c (Castagnoli) of a bytes-like object, continuing from `value`."""
    return int(_crc32c.crc32c(data, value=value))


_POLY = 0x82F63B78  # reflected Castagnoli polynomial


def _gf2_times(matrix: tuple[int, ...], vector: int) -> int:
    out, row = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[row]
        vector >>= 1
        row += 1
    return out


def _gf2_square(matrix: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_gf2_times(matrix, matrix[n]) for n in range(32))


@lru_cache(maxsize=1)
def _zero_byte_operators() -> tuple[tuple[int, ...], ...]:
    """Operators that advance a crc over 2**k zero bytes, k = 0..47."""
    one_bit = (_POLY, *(1 << n for n in range(31)))
    op = _gf2_square(_gf2_square(_gf2_square(one_bit)))  # 8 zero bits = one byte
    ops = [op]
    for _ in range(47):
        op = _gf2_square(op)
        ops.append(op)
    return tuple(ops)


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """crc32c(a + b) from crc32c(a), crc32c(b) and len(b), without touching the bytes.

    Chunk checksums are computed once each; the whole-tensor checksum is folded from
    them, so no byte is hashed twice on either side of the wire.
    """
    ops = _zero_byte_operators()
    k = 0
    while len2:
        if len2 & 1:
            crc1 = _gf2_times(ops[k], crc1)
        len2 >>= 1
        k += 1
    return crc1 ^ crc2


# ---------------------------------------------------------------------- varint codec


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise IntegrityError("malformed varint in chunk")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


# TensorChunk / FileChunk field tags (field number << 3 | wire type).
_TAG_HEADER = b"\x0a"  # 1, length-delimited
_TAG_INDEX = b"\x10"  # 2, varint
_TAG_OFFSET = b"\x18"  # 3, varint
_TAG_CRC = 0x25  # 4, fixed32
_TAG_LAST = b"\x28\x01"  # 5, varint true
_TAG_TENSOR_CRC = 0x35  # 6, fixed32
_TAG_DATA = b"\x7a"  # 15, length-delimited
_TAG_PACKING = b"\x3a"  # 7, length-delimited
_TAG_INFO_CRC = 0x2D  # TensorInfo.crc32c: 5, fixed32
_FIXED32 = struct.Struct("<BI")


def encode_chunk_prefix(
    *,
    header: bytes | None,
    tensor_index: int,
    offset: int,
    crc: int,
    last: bool,
    tensor_crc: int,
    data_len: int,
) -> bytes:
    """The bytes of a TensorChunk up to and including the data field's length.

    The caller appends exactly `data_len` payload bytes to form the message.

    Args:
        header: a serialized TensorHeader, on the first chunk of a tensor in a stream.
        tensor_index: the tensor's position in the manifest.
        offset: byte offset of the payload within the served tensor.
        crc: crc32c of the payload.
        last: whether this is the tensor's last chunk.
        tensor_crc: crc32c of the whole tensor (written only when `last`).
        data_len: payload length.
    """
    parts = []
    if header is not None:
        parts += [_TAG_HEADER, _varint(len(header)), header]
    if tensor_index:
        parts += [_TAG_INDEX, _varint(tensor_index)]
    if offset:
        parts += [_TAG_OFFSET, _varint(offset)]
    parts.append(_FIXED32.pack(_TAG_CRC, crc))
    if last:
        parts += [_TAG_LAST, _FIXED32.pack(_TAG_TENSOR_CRC, tensor_crc)]
    parts += [_TAG_DATA, _varint(data_len)]
    return b"".join(parts)


def encode_packed_prefix(*, indices: Sequence[int], sizes: Sequence[int], crcs: Sequence[int], crc: int) -> bytes:
    """The bytes of a packed TensorChunk up to its data's length (TRANSPORT_GRPC_PACKED).

    The caller appends the tensors' bytes back to back (`sum(sizes)` of them).

    Args:
        indices: each tensor's position in the manifest, in stream order.
        sizes: each tensor's byte size.
        crcs: each tensor's crc32c.
        crc: crc32c of all the data.
    """
    ints = b"".join(_varint(i) for i in indices)
    lengths = b"".join(_varint(n) for n in sizes)
    digests = struct.pack(f"<{len(crcs)}I", *crcs)
    packing = b"".join((
        b"\x0a", _varint(len(ints)), ints,
        b"\x12", _varint(len(lengths)), lengths,
        b"\x1a", _varint(len(digests)), digests,
    ))  # fmt: skip
    parts = []
    if indices[0]:
        parts += [_TAG_INDEX, _varint(indices[0])]
    parts += [_FIXED32.pack(_TAG_CRC, crc), _TAG_LAST, _TAG_PACKING, _varint(len(packing)), packing]
    parts += [_TAG_DATA, _varint(sum(sizes))]
    return b"".join(parts)


def encode_tensor_header(name: str, dtype: str, shape: tuple[int, ...], nbytes: int) -> bytes:
    """A serialized TensorHeader (name, dtype, packed shape, nbytes), written by hand so
    the server's data path needs no protobuf objects. TensorInfo shares these four fields,
    so it is also a TensorInfo without its digest (see `with_crc32c`)."""
    name_b, dtype_b = name.encode(), dtype.encode()
    parts = [b"\x0a", _varint(len(name_b)), name_b, b"\x12", _varint(len(dtype_b)), dtype_b]
    if shape:
        packed = b"".join(_varint(d) for d in shape)
        parts += [b"\x1a", _varint(len(packed)), packed]
    if nbytes:
        parts += [b"\x20", _varint(nbytes)]
    return b"".join(parts)


def with_crc32c(message: bytes, crc: int | None) -> bytes:
    """A TensorInfo (or any message whose field 5 is an optional fixed32 digest) with `crc` set, if given."""
    return message if crc is None else message + _FIXED32.pack(_TAG_INFO_CRC, crc)


def encode_repeated(field_number: int, messages: Iterable[bytes]) -> bytes:
    """Encoded messages as one repeated message field (appended to a message, protobuf merges it in)."""
    tag = _varint(field_number << 3 | 2)
    return b"".join(part for message in messages for part in (tag, _varint(len(message)), message))


@dataclass(frozen=True)
class ChunkView:
    """A parsed TensorChunk whose payload is a view into the received message."""

    header: bytes | None
    tensor_index: int
    offset: int
    crc: int
    last: bool
    tensor_crc: int
    data: memoryview
    packing: memoryview | None = None
    """The serialized Packing of a packed chunk (TRANSPORT_GRPC_PACKED), else None."""


def _fields(buf: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) for every field of a protobuf message, in wire order.

    Varint and fixed32 values are ints, length-delimited ones views into `buf`;
    fixed64 fields are skipped (TensorChunk has none).
    """
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _read_varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(buf, pos)
            yield field, value
        elif wire_type in (1, 5):
            width = 8 if wire_type == 1 else 4
            if pos + width > end:
                raise IntegrityError(f"truncated fixed{width * 8} in chunk")
            if wire_type == 5:
                yield field, int.from_bytes(buf[pos : pos + 4], "little")
            pos += width
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos)
            if pos + length > end:
                raise IntegrityError("truncated length-delimited field in chunk")
            yield field, buf[pos : pos + length]
            pos += length
        else:
            raise IntegrityError(f"unsupported wire type {wire_type} in chunk")


_INT_FIELDS = {2: "tensor_index", 3: "offset", 4: "crc", 5: "last", 6: "tensor_crc"}


def decode_chunk(message: bytes) -> ChunkView:
    """Parse a serialized TensorChunk without copying its payload.

    Accepts any valid encoding (fields in any order, defaults omitted or present,
    unknown fields skipped), so servers in other languages interoperate.

    Raises:
        IntegrityError: the message is not a parseable TensorChunk.
    """
    buf = memoryview(message)
    ints = dict.fromkeys(_INT_FIELDS.values(), 0)
    header: bytes | None = None
    packing: memoryview | None = None
    data = buf[0:0]
    for field, value in _fields(buf):
        if isinstance(value, int):
            if field in _INT_FIELDS:
                ints[_INT_FIELDS[field]] = value
        elif field == 1:
            header = bytes(value)
        elif field == 15:
            data = value
        elif field == 7:
            packing = value
    return ChunkView(
        header,
        ints["tensor_index"],
        ints["offset"],
        ints["crc"],
        bool(ints["last"]),
        ints["tensor_crc"],
        data,
        packing,
    )


# ----------------------------------------------------------------------- manifest id


def manifest_id(revision: str, plan_params: dict[str, Any]) -> str:
    """Hash of the resolved revision, the plan's parameters and the wire version.

    Stable across restarts and replicas: it depends on nothing but its inputs.
    """
    blob = json.dumps(
        {"wire": WIRE_VERSION, "revision": revision, "plan": plan_params},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]
