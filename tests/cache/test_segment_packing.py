"""Small tensors sharing segments: RecordIndex blocks and pack_small, on synthetic records and pieces.

Blocks: runs of small checkpoint tensors close together in one file become one segment,
cut by a large tensor, a gap over BLOCK_GAP or BLOCK_BYTES, and keeping the file's
alignment mod ALIGN. Packs: runs of small own-bytes segments laid end to end, each
member ALIGN-aligned with zeros between, in order. Segments built from both hold the
bytes the tensors are read from.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightserve.cache.segments import (
    ALIGN,
    BLOCK_BYTES,
    BLOCK_GAP,
    SMALL_TENSOR,
    Placement,
    RecordIndex,
    SegmentSpec,
    build_segment,
    pack_small,
    placement_of,
)
from weightserve.loaders.base import TensorRecord
from weightserve.loaders.pieces import ZEROS, Piece, read_range
from weightserve.loaders.sources import FileSource, MemorySource


def record(name: str, offset: int, nbytes: int, source: int = 0) -> TensorRecord:
    return TensorRecord(name, "U8", (nbytes,), source, offset, nbytes)


def laid_out(sizes: list[int], start: int = 0, gap: int = 0, source: int = 0) -> list[TensorRecord]:
    """Records of `sizes` bytes back to back from `start`, `gap` bytes apart."""
    out = []
    at = start
    for n, size in enumerate(sizes):
        out.append(record(f"t{n}", at, size, source))
        at += size + gap
    return out


def whole(r: TensorRecord) -> Piece:
    return Piece(r.source, r.offset, r.nbytes)


def contains(segment: Piece, r: TensorRecord) -> bool:
    return (
        segment.source == r.source
        and segment.offset <= r.offset
        and r.offset + r.nbytes <= segment.offset + segment.nbytes
    )


def own(*pieces: Piece) -> Placement:
    """A placement with a segment of its own bytes (a dim-1 slice, a fused tensor)."""
    return Placement(SegmentSpec(("pieces", pieces), pieces), 0)


def of_record(r: TensorRecord) -> Placement:
    return Placement(SegmentSpec(("record", r.source, r.offset, r.nbytes), (whole(r),)), 0)


def slice_of(size: int, source: int = 0, offset: int = 0) -> Placement:
    """An own-bytes placement of `size` bytes: two rows, as a dim-1 slice reads them."""
    return own(Piece(source, offset, size // 2, rows=2, stride=size))


def check_packed(before: list[Placement], after: list[Placement]) -> None:
    """Each member of a pack starts ALIGN-aligned on its own pieces, with only zeros between members."""
    assert len(after) == len(before)
    packs: dict[object, list[tuple[Placement, Placement]]] = {}
    for b, a in zip(before, after, strict=True):
        if a is b:
            continue
        assert a.spec.key[0] == "pack" and b.spec.key[0] == "pieces" and b.spec.size < SMALL_TENSOR
        assert a.offset % ALIGN == 0
        packs.setdefault(a.spec.key, []).append((b, a))
    for members in packs.values():
        spec = members[0][1].spec
        assert len(members) > 1 and spec.size <= BLOCK_BYTES
        starts = [0]
        for piece in spec.pieces:
            starts.append(starts[-1] + piece.nbytes)
        at = {start: n for n, start in enumerate(starts[:-1])}
        covered = 0
        for b, a in members:
            assert a.offset >= covered  # in order, no overlap
            first = at[a.offset]
            assert all(p.source == ZEROS for p in spec.pieces[at[covered] : first]) and a.offset - covered < ALIGN
            assert spec.pieces[first : first + len(b.spec.pieces)] == b.spec.pieces
            covered = a.offset + b.spec.size
        assert covered == spec.size


def test_small_neighbours_share_one_block_in_each_file() -> None:
    first = laid_out([100, 200, 64, 4096], start=64)
    second = laid_out([128, 128], start=64, source=1)
    index = RecordIndex([*first, *second])
    assert {index.segment_of(r) for r in first} == {Piece(0, 64, 100 + 200 + 64 + 4096)}
    assert {index.segment_of(r) for r in second} == {Piece(1, 64, 256)}
    placement = placement_of((whole(first[2]),), index)
    assert placement.spec.key == ("record", 0, 64, 4460) and placement.offset == 300
    rows = Piece(0, first[3].offset + 1024, 1024)  # a dim-0 slice of a small tensor: a range of its block
    assert placement_of((rows,), index).offset == 300 + 64 + 1024


def test_a_lone_small_record_keeps_its_own_segment() -> None:
    lone = record("bias", 1000, 12)
    index = RecordIndex([lone, *laid_out([SMALL_TENSOR], start=1012)])
    assert index.segment_of(lone) == whole(lone)
    placement = placement_of((whole(lone),), index)
    assert placement.spec.key == ("record", 0, 1000, 12) and placement.offset == 0


def test_a_large_record_keeps_its_own_segment_and_splits_the_run() -> None:
    records = laid_out([64, SMALL_TENSOR - 1, SMALL_TENSOR, 128, 256])
    a, b, large, c, d = records
    index = RecordIndex(records)
    assert index.segment_of(a) == index.segment_of(b) == Piece(0, 0, SMALL_TENSOR + 63)  # just under: small
    assert index.segment_of(large) == whole(large)
    assert c.offset % ALIGN == 63
    assert index.segment_of(c) == index.segment_of(d) == Piece(0, c.offset - 63, 63 + 384)
    assert placement_of((whole(large),), index).spec.key == ("record", 0, large.offset, SMALL_TENSOR)


def test_a_gap_over_block_gap_splits_a_run() -> None:
    a, b = laid_out([64, 64], gap=BLOCK_GAP)
    c = record("c", b.offset + 64 + BLOCK_GAP + 1, 64)
    index = RecordIndex([a, b, c])
    assert index.segment_of(a) == index.segment_of(b) == Piece(0, 0, 128 + BLOCK_GAP)  # a gap of exactly BLOCK_GAP
    assert index.segment_of(c) == whole(c)


def test_a_run_is_cut_at_block_bytes() -> None:
    records = laid_out([SMALL_TENSOR // 2] * 40, start=8)
    index = RecordIndex(records)
    blocks = [index.segment_of(r) for r in records]
    assert all(contains(block, r) for block, r in zip(blocks, records, strict=True))
    distinct = list(dict.fromkeys(blocks))
    assert [blocks.count(b) for b in distinct] == [32, 8]
    for block in distinct:
        members = [r for r, b in zip(records, blocks, strict=True) if b == block]
        assert members[-1].offset + members[-1].nbytes - members[0].offset <= BLOCK_BYTES


def test_overlapping_records_stay_inside_their_block() -> None:
    storage = record("fused", 64, 4096)  # views of one storage in a pickle: ranges that overlap
    views = [record("q", 64, 1024), record("k", 1088, 1024), record("tail", 3136, 1024)]
    after = record("next", 4160, 256)
    records = [storage, *views, after]
    index = RecordIndex(records)
    assert {index.segment_of(r) for r in records} == {Piece(0, 64, 4096 + 256)}
    for r in records:
        placement = placement_of((whole(r),), index)
        assert placement.offset + r.nbytes <= placement.spec.size


@pytest.mark.parametrize("view_first", [True, False])
def test_a_small_view_at_a_large_records_offset_keeps_the_large_one_whole(view_first: bool) -> None:
    """A small view starting where a large storage starts (its first rows, saved beside it in a pickle)."""
    bias = record("bias", 0, 64)
    view = record("q", 64, 1024)
    large = record("fused", 64, 2 * SMALL_TENSOR)
    index = RecordIndex([bias, view, large] if view_first else [bias, large, view])
    assert contains(index.segment_of(view), view)
    assert index.segment_of(large) == whole(large)
    placement = placement_of((whole(large),), index)
    assert placement.offset + large.nbytes <= placement.spec.size


@pytest.mark.parametrize("data_start", [8, 100, 1000, 4096 + 40])
def test_a_block_keeps_the_files_alignment_mod_64(data_start: int) -> None:
    records = laid_out([7, 64, 32, 4], start=data_start)  # an odd-sized int8 tensor first: the rest misaligned
    index = RecordIndex(records)
    block = index.segment_of(records[0])
    assert block.offset % ALIGN == 0 and block.offset <= data_start < block.offset + ALIGN
    for r in records:
        placement = placement_of((whole(r),), index)
        assert placement.offset % ALIGN == r.offset % ALIGN


def test_pack_small_packs_runs_in_order_aligned_with_zero_padding() -> None:
    before = [slice_of(100, offset=0), slice_of(64, offset=4096), own(Piece(0, 9000, 30), Piece(ZEROS, 0, 6))]
    after = pack_small(before)
    check_packed(before, after)
    assert [p.offset for p in after] == [0, 128, 192]
    (spec,) = {p.spec for p in after}
    assert spec.pieces[1] == Piece(ZEROS, 0, 28) and spec.size == 192 + 36
    assert pack_small(before) == after  # same members, same key: one segment per request


def test_pack_small_leaves_large_and_record_placements_alone_and_they_split_runs() -> None:
    big = slice_of(SMALL_TENSOR)
    ranged = of_record(record("norm", 64, 128))
    before = [slice_of(32), slice_of(32), big, slice_of(40), ranged, slice_of(48), slice_of(50), slice_of(52)]
    after = pack_small(before)
    check_packed(before, after)
    assert after[2] is big and after[4] is ranged
    assert after[3] is before[3]  # alone between a large one and a record: nothing to share with
    keys = [p.spec.key for p in after]
    assert keys[0] == keys[1] != keys[5] == keys[6] == keys[7]


def test_a_lone_small_placement_is_not_packed() -> None:
    lone = [slice_of(10)]
    assert pack_small(lone)[0] is lone[0]
    assert pack_small([]) == []


def test_a_pack_is_cut_at_block_bytes() -> None:
    size = SMALL_TENSOR - 1000
    before = [own(Piece(0, n * SMALL_TENSOR, size)) for n in range(40)]
    after = pack_small(before)
    check_packed(before, after)
    keys = [p.spec.key for p in after]
    assert [keys.count(k) for k in dict.fromkeys(keys)] == [16, 16, 8]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["own", "large", "record"]), st.integers(1, 3 * SMALL_TENSOR // 2)),
        max_size=40,
    )
)
def test_pack_small_places_every_byte_once(kinds: list[tuple[str, int]]) -> None:
    before = []
    for n, (kind, size) in enumerate(kinds):
        if kind == "record":
            before.append(of_record(record(f"r{n}", n * 4 * SMALL_TENSOR, size)))
        else:
            before.append(own(Piece(0, n * 4 * SMALL_TENSOR, size if kind == "own" else size + SMALL_TENSOR)))
    after = pack_small(before)
    check_packed(before, after)
    for b, a in zip(before, after, strict=True):
        if b.spec.key[0] != "pieces" or b.spec.size >= SMALL_TENSOR:
            assert a is b


def segment_bytes(spec: SegmentSpec, sources: list[FileSource] | list[MemorySource]) -> bytes:
    segment = build_segment(spec, sources, "test")
    try:
        assert segment.size == spec.size
        return os.pread(segment.fd, segment.size, 0)
    finally:
        segment.close()


def test_a_block_segment_holds_the_files_bytes(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    data = os.urandom(8192)
    path.write_bytes(data)
    records = laid_out([7, 64, 33, 1000, 16], start=40)
    source = FileSource(path)
    try:
        index = RecordIndex(records)
        for r in records:
            placement = placement_of((whole(r),), index)
            held = segment_bytes(placement.spec, [source])
            assert held[placement.offset : placement.offset + r.nbytes] == data[r.offset : r.offset + r.nbytes]
    finally:
        source.close()


def test_a_pack_segment_holds_each_members_bytes_and_zeros_between() -> None:
    data = bytes(range(256)) * 64
    sources = [MemorySource("memory", data)]
    before = [
        own(Piece(0, 3, 5, rows=4, stride=40)),  # a dim-1 slice of a [4, 40] int8 tensor
        own(Piece(0, 1000, 30), Piece(ZEROS, 0, 2)),  # fused with padding
        own(Piece(0, 77, 130)),
    ]
    after = pack_small(before)
    check_packed(before, after)
    held = segment_bytes(after[0].spec, sources)
    covered = 0
    for b, a in zip(before, after, strict=True):
        expected = bytearray(b.spec.size)
        read_range(b.spec, sources, 0, memoryview(expected))
        assert held[a.offset : a.offset + b.spec.size] == expected
        assert held[covered : a.offset] == bytes(a.offset - covered)
        covered = a.offset + b.spec.size
