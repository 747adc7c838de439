"""Packed chunks (TRANSPORT_GRPC_PACKED) without a network: which tensors `packed_jobs`
packs, and that `read_pack` puts each tensor's own bytes where its Packing says.

The oracle for a tensor's bytes is the file sliced in Python (rows, zeros, padding),
checked against `read_range` too; a cached tensor's bytes are its cached payload, made
to differ from the file so a pack that re-reads the file instead is caught. Tensors
adjacent in a file but not in the message (another tensor, read another way, between
them) must not be read with one call: that wrote one tensor's bytes over another's.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightserve import wire
from weightserve.cache.entry import CachedChunk, CachedPack
from weightserve.loaders.pieces import ZEROS, Piece, read_range
from weightserve.loaders.sources import FileSource, Source
from weightserve.server import chunk_stream
from weightserve.server.chunk_stream import (
    MAX_PACKED,
    PACK_FRACTION,
    ChunkJob,
    PackJob,
    chunk_jobs,
    packed_jobs,
    read_chunk,
    read_pack,
)
from weightserve.sharding.tensor_plan import TensorPlan
from weightserve.v1 import weightserve_pb2 as pb

FILE_BYTES = 4096
SMALL = 64
"""Largest contiguous piece the generated plans take (cursors stay well inside a file)."""

# ------------------------------------------------------------------ packed_jobs


def sized_plans(sizes: Sequence[int]) -> list[TensorPlan]:
    """Plans of the given byte sizes (their bytes do not matter to job planning)."""
    return [TensorPlan(f"t{i}", "U8", (n,), (Piece(ZEROS, 0, n),) if n else ()) for i, n in enumerate(sizes)]


def check_jobs(plans: list[TensorPlan], selection: list[int], start: int, chunk_bytes: int) -> list[ChunkJob | PackJob]:
    """packed_jobs' output, after checking every invariant the stream relies on."""
    jobs = list(packed_jobs(plans, selection, start, chunk_bytes))
    limit = chunk_bytes // PACK_FRACTION
    resumed = selection[0] if start else None
    order: list[int] = []
    chunked: dict[int, list[ChunkJob]] = {}
    for job in jobs:
        if isinstance(job, PackJob):
            sizes = [plans[i].nbytes for i in job.indices]
            assert 1 <= len(job.indices) <= MAX_PACKED, job
            assert sum(sizes) <= chunk_bytes, (job, sizes)
            assert all(n <= limit for n in sizes), (job, sizes, limit)
            assert resumed not in job.indices, "a tensor resumed mid-way was packed whole"
            order.extend(job.indices)
        else:
            if job.first:
                order.append(job.index)
            chunked.setdefault(job.index, []).append(job)
    assert order == selection, "not every selected tensor exactly once, in selection order"
    for index, runs in chunked.items():
        offset = start if index == resumed else 0
        # the same chunks a plain stream sends, so both meet the same cached chunks
        assert runs == list(chunk_jobs(plans, [index], offset, chunk_bytes)), index
        assert runs[0].offset == offset and sum(j.length for j in runs) == plans[index].nbytes - offset
        assert plans[index].nbytes > limit or index == resumed, f"tensor {index} of {plans[index].nbytes} was chunked"
    # greedy: a pack ends only when the next small tensor would overflow it (or it is full)
    for before, after in itertools.pairwise(jobs):
        if isinstance(before, PackJob) and isinstance(after, PackJob):
            size = sum(plans[i].nbytes for i in before.indices)
            full = len(before.indices) == MAX_PACKED
            assert full or size + plans[after.indices[0]].nbytes > chunk_bytes, (before, after)
    return jobs


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 1200), min_size=1, max_size=40),
    chunk_bytes=st.sampled_from([64, 100, 256, 1024, 4096]),
    data=st.data(),
)
def test_packed_jobs_place_every_tensor_once(sizes: list[int], chunk_bytes: int, data: st.DataObject) -> None:
    plans = sized_plans(sizes)
    selection = data.draw(st.lists(st.integers(0, len(sizes) - 1), min_size=1, unique=True), label="selection")
    start = data.draw(st.integers(0, plans[selection[0]].nbytes), label="start_offset")
    check_jobs(plans, selection, start, chunk_bytes)


def test_small_tensors_share_messages_and_large_ones_are_chunked() -> None:
    plans = sized_plans([10, 20, 300, 30, 40, 50, 0, 1000, 5])
    jobs = check_jobs(plans, list(range(9)), 0, 256)  # limit 64
    assert jobs == [
        PackJob((0, 1)),
        ChunkJob(2, 0, 256, True, False),
        ChunkJob(2, 256, 44, False, True),
        PackJob((3, 4, 5, 6)),
        ChunkJob(7, 0, 256, True, False),
        ChunkJob(7, 256, 256, False, False),
        ChunkJob(7, 512, 256, False, False),
        ChunkJob(7, 768, 232, False, True),
        PackJob((8,)),
    ]


def test_a_pack_closes_before_it_would_overflow() -> None:
    plans = sized_plans([64] * 9)
    assert check_jobs(plans, list(range(9)), 0, 256) == [PackJob((0, 1, 2, 3)), PackJob((4, 5, 6, 7)), PackJob((8,))]


def test_a_resumed_tensor_is_chunked_from_its_offset_and_the_rest_packed() -> None:
    plans = sized_plans([40, 30, 20, 600])
    jobs = check_jobs(plans, [0, 1, 2, 3], 17, 256)
    assert jobs[:2] == [ChunkJob(0, 17, 23, True, True), PackJob((1, 2))]
    jobs = check_jobs(plans, [3, 0, 1], 300, 256)  # a large one resumed mid-way, on chunk boundaries
    assert jobs == [ChunkJob(3, 300, 212, True, False), ChunkJob(3, 512, 88, False, True), PackJob((0, 1))]


def test_empty_tensors_are_packed() -> None:
    plans = sized_plans([0, 0, 7, 0])
    assert check_jobs(plans, [0, 1, 2, 3], 0, 4096) == [PackJob((0, 1, 2, 3))]


def test_at_most_max_packed_tensors_a_message() -> None:
    plans = sized_plans([0] * (2 * MAX_PACKED + 1))
    jobs = check_jobs(plans, list(range(len(plans))), 0, 4096)
    assert [len(j.indices) for j in jobs if isinstance(j, PackJob)] == [MAX_PACKED, MAX_PACKED, 1]


def test_max_packed_cuts_runs_of_small_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunk_stream, "MAX_PACKED", 3)
    plans = sized_plans([1, 0, 2, 3, 4, 0, 5])
    jobs = list(packed_jobs(plans, list(range(7)), 0, 4096))
    assert jobs == [PackJob((0, 1, 2)), PackJob((3, 4, 5)), PackJob((6,))]


# -------------------------------------------------------------------- read_pack


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[bytes], list[FileSource]]:
    """Two files of seeded random bytes, and a FileSource on each."""
    folder = tmp_path_factory.mktemp("packed")
    rng = random.Random(7)
    contents = []
    for n in range(2):
        data = rng.randbytes(FILE_BYTES)
        (folder / f"f{n}.bin").write_bytes(data)
        contents.append(data)
    return contents, [FileSource(folder / f"f{n}.bin") for n in range(2)]


def piece_bytes(piece: Piece, contents: list[bytes]) -> bytes:
    """A piece's bytes sliced out of the files in Python: the oracle."""
    if piece.source == ZEROS:
        return bytes(piece.nbytes)
    data = contents[piece.source]
    rows = [data[piece.offset + r * piece.stride :][: piece.row_bytes] for r in range(piece.rows)]
    return b"".join(rows)


def plan_bytes(plan: TensorPlan, contents: list[bytes], sources: list[FileSource]) -> bytes:
    want = b"".join(piece_bytes(p, contents) for p in plan.pieces)
    got = bytearray(plan.nbytes)
    read_range(plan, sources, 0, memoryview(got))
    assert bytes(got) == want, f"{plan.name}: read_range disagrees with the file"
    return want


def cached_chunk(plan: TensorPlan, index: int, payload: bytes) -> CachedChunk:
    """A canonical chunk of a whole tensor holding `payload` (inverted file bytes in these tests)."""
    crc = wire.crc32c(payload)
    prefix = wire.encode_chunk_prefix(
        header=chunk_stream.header_of(plan), tensor_index=index, offset=0, crc=crc, last=False, tensor_crc=0,
        data_len=len(payload),
    )  # fmt: skip
    return CachedChunk(prefix + payload, len(prefix), crc)


def pack_and_check(
    plans: list[TensorPlan],
    indices: Sequence[int],
    from_cache: Sequence[bool],
    files: tuple[list[bytes], list[FileSource]],
) -> CachedPack:
    """read_pack, each tensor checked against the oracle; returns the pack."""
    contents, sources = files
    indices = tuple(indices)
    expected: list[bytes] = []
    cached: list[CachedChunk | None] = []
    for index, hit in zip(indices, from_cache, strict=True):
        data = plan_bytes(plans[index], contents, sources)
        if hit:
            data = bytes(b ^ 0xFF for b in data)  # not the file's: the pack must take the cache's
            cached.append(cached_chunk(plans[index], index, data))
        else:
            cached.append(None)
        expected.append(data)

    kept = read_pack(plans, list(sources), indices, cached)

    chunk = wire.decode_chunk(kept.message)
    assert chunk.packing is not None, "no Packing in a packed chunk"
    packing = pb.Packing.FromString(bytes(chunk.packing))
    assert list(packing.tensor_index) == list(indices)
    assert list(packing.nbytes) == [len(e) for e in expected]
    at = 0
    for index, want in zip(indices, expected, strict=True):
        got = bytes(chunk.data[at : at + len(want)])
        assert got == want, f"tensor {index} ({plans[index].pieces}) at data byte {at}: wrong bytes"
        at += len(want)
    assert at == len(chunk.data)
    crcs = [wire.crc32c(e) for e in expected]
    assert list(packing.crc32c) == crcs and list(kept.crcs) == crcs
    assert chunk.crc == wire.crc32c(b"".join(expected))
    assert chunk.tensor_index == indices[0]
    stock = pb.TensorChunk.FromString(kept.message)  # plain protobuf parses it the same
    assert stock.data == b"".join(expected) and stock.packing == packing

    assert len(kept.chunks) == len(indices)
    for index, hit, want, crc, fresh in zip(indices, from_cache, expected, crcs, kept.chunks, strict=True):
        if hit:
            assert fresh is None, f"tensor {index} came from the cache but was offered to it again"
            continue
        assert fresh is not None, f"tensor {index} was read from its file but not kept"
        # exactly the chunk a plain stream would cache under the same key (index, 0, nbytes)
        assert fresh.message == read_chunk(plans[index], list[Source](sources), index, 0, len(want)).message, index
        view = wire.decode_chunk(fresh.message)
        header = pb.TensorHeader.FromString(view.header or b"")
        plan = plans[index]
        assert (header.name, header.dtype, tuple(header.shape), header.nbytes) == (
            plan.name, plan.dtype, plan.shape, plan.nbytes,
        )  # fmt: skip
        assert (view.tensor_index, view.offset, view.last, view.packing) == (index, 0, False, None)
        assert bytes(view.data) == want and bytes(fresh.payload) == want
        assert view.crc == crc == fresh.crc
    return kept


def plan(name: str, *pieces: Piece, dtype: str = "U8") -> TensorPlan:
    nbytes = sum(p.nbytes for p in pieces)
    return TensorPlan(name, dtype, (nbytes,), tuple(pieces))


BETWEEN = {
    "cached": (Piece(1, 500, 24), True),
    "rows": (Piece(0, 1000, 8, rows=3, stride=40), False),
    "zeros": (Piece(ZEROS, 0, 24), False),
    "other file": (Piece(1, 116, 24), False),  # the very offset that follows A, in the other file
    "elsewhere in the file": (Piece(0, 2000, 24), False),
}


@pytest.mark.parametrize("kind", sorted(BETWEEN))
def test_tensors_adjacent_in_the_file_but_not_the_message_are_read_apart(
    files: tuple[list[bytes], list[FileSource]], kind: str
) -> None:
    piece, hit = BETWEEN[kind]
    plans = [plan("a", Piece(0, 100, 16)), plan("b", piece), plan("c", Piece(0, 116, 16))]
    pack_and_check(plans, [0, 1, 2], [False, hit, False], files)


def test_a_cached_tensor_between_two_file_runs_keeps_its_place(files: tuple[list[bytes], list[FileSource]]) -> None:
    # A B C D: A, C, D back to back in the file; B cached. A reads alone, C and D together.
    plans = [
        plan("a", Piece(0, 64, 8)),
        plan("b", Piece(0, 72, 8)),  # what follows A in the file, but from the cache
        plan("c", Piece(0, 72, 8)),
        plan("d", Piece(0, 80, 32)),
    ]
    pack_and_check(plans, [0, 1, 2, 3], [False, True, False, False], files)


def test_file_runs_in_any_message_order(files: tuple[list[bytes], list[FileSource]]) -> None:
    plans = [plan(f"t{i}", Piece(0, 16 * i, 16)) for i in range(6)]
    pack_and_check(plans, [0, 1, 2, 3, 4, 5], [False] * 6, files)  # one read
    pack_and_check(plans, [5, 4, 3, 2, 1, 0], [False] * 6, files)  # back to front: six
    pack_and_check(plans, [1, 2, 0, 4, 5, 3], [False] * 6, files)
    pack_and_check(plans, [0, 2, 1, 3], [False] * 4, files)


def test_empty_tensors_and_padding_in_a_pack(files: tuple[list[bytes], list[FileSource]]) -> None:
    plans = [
        plan("empty0"),
        plan("a", Piece(0, 0, 8)),
        plan("empty1"),
        plan("b", Piece(0, 8, 8)),  # adjacent in file and message across an empty tensor
        plan("padded", Piece(0, 16, 8), Piece(ZEROS, 0, 8)),
        plan("c", Piece(0, 24, 8)),
    ]
    pack_and_check(plans, range(6), [False] * 6, files)
    pack_and_check(plans, range(6), [True, False, True, False, False, False], files)
    pack_and_check([plan("e0"), plan("e1")], [0, 1], [False, True], files)


@st.composite
def packs(draw: st.DrawFn) -> tuple[list[TensorPlan], list[int], list[bool]]:
    """Plans of every kind, contiguous ones often back to back in a file, and a message order.

    Identity order keeps file neighbours next to each other, with other kinds between
    them as drawn; a permutation moves them apart.
    """
    cursors = [draw(st.integers(0, 64)) for _ in range(2)]
    plans: list[TensorPlan] = []
    for i in range(draw(st.integers(1, 14))):
        kind = draw(
            st.sampled_from(["next", "next", "next", "elsewhere", "repeat", "rows", "zeros", "empty", "padded"])
        )
        src = draw(st.integers(0, 1))
        size = draw(st.integers(1, SMALL))
        pieces: tuple[Piece, ...]
        if kind == "next":  # right after the last "next" piece of that file
            pieces = (Piece(src, cursors[src], size),)
            cursors[src] += size
        elif kind == "elsewhere":
            pieces = (Piece(src, draw(st.integers(0, FILE_BYTES - size)), size),)
        elif kind == "repeat" and plans:  # a tied tensor: the same bytes again
            pieces = plans[draw(st.integers(0, len(plans) - 1))].pieces
        elif kind == "rows":
            row, rows = draw(st.integers(1, 16)), draw(st.integers(2, 6))
            stride = row + draw(st.integers(0, 48))
            span = (rows - 1) * stride + row
            pieces = (Piece(src, draw(st.integers(0, FILE_BYTES - span)), row, rows, stride),)
        elif kind == "zeros":
            pieces = (Piece(ZEROS, 0, size),)
        elif kind == "padded":
            pieces = (Piece(src, cursors[src], size), Piece(ZEROS, 0, draw(st.integers(1, 16))))
            cursors[src] += size
        else:
            pieces = ()
        plans.append(plan(f"t{i}", *pieces))
    identity = list(range(len(plans)))
    order = draw(
        st.one_of(
            st.just(identity), st.permutations(identity), st.lists(st.sampled_from(identity), min_size=1, unique=True)
        )
    )
    from_cache = draw(st.lists(st.booleans(), min_size=len(order), max_size=len(order)))
    return plans, order, from_cache


@settings(max_examples=400, deadline=None)
@given(case=packs())
def test_read_pack_equals_each_tensor_read_alone(
    files: tuple[list[bytes], list[FileSource]], case: tuple[list[TensorPlan], list[int], list[bool]]
) -> None:
    plans, order, from_cache = case
    pack_and_check(plans, order, from_cache, files)


def test_a_pack_of_a_whole_file_run_is_one_read(
    files: tuple[list[bytes], list[FileSource]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Back-to-back tensors of one file, in file order, cost one read (what the coalescing is for)."""
    _, sources = files
    calls: list[tuple[int, int]] = []
    real = FileSource.read_into

    def counting(self: FileSource, offset: int, dest: memoryview, check: bool = True) -> None:
        calls.append((offset, len(dest)))
        real(self, offset, dest, check)

    monkeypatch.setattr(FileSource, "read_into", counting)
    plans = [plan(f"t{i}", Piece(0, 100 + 10 * i, 10)) for i in range(8)]
    read_pack(plans, list(sources), tuple(range(8)), [None] * 8)
    assert calls == [(100, 80)]
