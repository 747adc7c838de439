"""The gRPC receive path puts a fetch's CPU tensors in one arena, as aligned views, and lets it go."""

from __future__ import annotations

import pytest
import torch

from weightserve import wire
from weightserve.client import assembly
from weightserve.client.assembly import ARENA_ALIGN, FetchSession
from weightserve.errors import IntegrityError
from weightserve.v1 import weightserve_pb2 as pb

CHUNK = 1000


def tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 5, generator=generator).to(torch.bfloat16),  # 30 bytes: the next one is misaligned
        "empty": torch.empty(0, 4, dtype=torch.float32),
        "b": torch.randn(700, generator=generator),  # several chunks
        "ids": torch.arange(9, dtype=torch.int64),
    }


def manifest(state: dict[str, torch.Tensor]) -> pb.GetManifestResponse:
    infos = []
    for name, t in state.items():
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        infos.append(
            pb.TensorInfo(
                name=name,
                dtype=wire.dtype_name(t.dtype),
                shape=list(t.shape),
                nbytes=len(data),
                crc32c=wire.crc32c(data),
            )
        )
    return pb.GetManifestResponse(tensors=infos, max_chunk_bytes=CHUNK)


def chunks(state: dict[str, torch.Tensor], corrupt_at: int | None = None) -> list[bytes]:
    """Every tensor's chunks, as the server encodes them; `corrupt_at`: flip a payload byte of that message."""
    out = []
    for index, t in enumerate(state.values()):
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        whole = wire.crc32c(data)
        for offset in range(0, max(len(data), 1), CHUNK):
            piece = data[offset : offset + CHUNK]
            last = offset + CHUNK >= len(data)
            prefix = wire.encode_chunk_prefix(header=None, tensor_index=index, offset=offset, crc=wire.crc32c(piece),
                                              last=last, tensor_crc=whole, data_len=len(piece))  # fmt: skip
            if corrupt_at == len(out) and piece:
                piece = bytes([piece[0] ^ 1]) + piece[1:]
            out.append(prefix + piece)
    return out


def receive(state: dict[str, torch.Tensor], corrupt_at: int | None = None) -> FetchSession:
    """Feed every chunk; a corrupt one is refused, then sent again intact (what a resumed stream does)."""
    session = FetchSession(manifest(state), None, torch.device("cpu"))
    session.stats.integrity_retries = 0
    messages = chunks(state)
    position = 0
    bad = chunks(state, corrupt_at)
    while not session.complete:
        try:
            session.accept(bad[position] if corrupt_at == position else messages[position])
            position += 1
        except IntegrityError:
            session.stats.integrity_retries += 1
            corrupt_at = None  # resume from the verified byte: the same chunk again, intact
    return session


def test_tensors_are_aligned_views_of_one_arena_with_the_right_bytes() -> None:
    state = tensors()
    got = receive(state).state_dict()
    assert list(got) == list(state)
    for name, t in state.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and got[name].equal(t)
    viewed = [got[n] for n in ("a", "b", "ids")]
    starts = sorted(t.data_ptr() for t in viewed)
    assert starts[-1] - starts[0] < sum(t.nbytes for t in viewed) + 2 * ARENA_ALIGN  # one allocation for the fetch
    assert all(t.data_ptr() % ARENA_ALIGN == 0 for t in viewed)
    # each tensor's storage is its own bytes: saving one writes only it, not the whole fetch
    assert all(t.untyped_storage().nbytes() == t.nbytes for t in viewed)
    got["b"].add_(1)  # writable, and private to this state dict
    assert got["a"].equal(state["a"])


def test_a_chunk_that_fails_its_checksum_is_written_again_in_place() -> None:
    state = tensors()
    session = receive(state, corrupt_at=2)  # the first chunk of "b"
    assert session.stats.integrity_retries == 1
    got = session.state_dict()
    assert all(got[n].equal(t) for n, t in state.items())


def test_converting_the_dtype_leaves_nothing_viewing_the_arena() -> None:
    state = tensors()
    session = receive(state)
    assert session._arena is not None
    inside = [t.data_ptr() for t in session.state_dict().values() if t.numel()]
    start, end = min(inside), max(inside) + 1
    got = session.state_dict(torch.float32)
    assert got["a"].dtype == torch.float32 and got["a"].equal(state["a"].float())
    assert got["ids"].dtype == torch.int64 and got["ids"].equal(state["ids"])
    # the int tensor was copied out too: the mapping goes once the session does
    assert not any(start <= t.data_ptr() < end for t in got.values() if t.numel())


def test_destinations_are_written_in_place_and_kept_out_of_the_arena() -> None:
    state = tensors()
    into = {"b": torch.zeros(700)}
    session = FetchSession(manifest(state), None, torch.device("cpu"), destinations=into)
    for message in chunks(state):
        session.accept(message)
    got = session.state_dict()
    assert got["b"] is into["b"] and into["b"].equal(state["b"])
    assert got["a"].untyped_storage().data_ptr() != into["b"].untyped_storage().data_ptr()


@pytest.mark.skipif(assembly._LIBC is None, reason="madvise through libc: Linux only")
def test_tune_malloc_applies_once_and_can_be_declined(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assembly, "_MALLOC_TUNED", [])
    monkeypatch.setattr(assembly, "TUNE_MALLOC", False)
    assert assembly.tune_malloc() is False
    monkeypatch.setattr(assembly, "TUNE_MALLOC", True)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # the process chose its own malloc settings
    assert assembly.tune_malloc() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    for key in [k for k in assembly.os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(key)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert assembly.tune_malloc() is True
    assert assembly._MALLOC_TUNED == [True]
    assert assembly.tune_malloc() is True and assembly._MALLOC_TUNED == [True]  # once
