"""A checkpoint file truncated or rewritten while it is streamed costs that stream DATA_LOSS, nothing else.

The stream is held early by a FaultProxy while the file is damaged, so most of the
file is still to be read; the client's small receive window (`slow_client`) keeps the
server from reading far ahead into kernel buffers before the damage.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch

from tests.integration.faultkit import MID_MODEL, Background, FaultProxy, assert_bit_identical, load_checkpoint
from weightserve.client import WeightClient
from weightserve.errors import FetchError
from weightserve.testing import BackgroundServer, LlamaShape, write_llama_checkpoint

ServeFn = Callable[..., BackgroundServer]
CHUNK = 4096
HELD_AT = 64 * 1024
"""Server bytes let through before the damage: a small part of the first file."""
BYSTANDER = "org/bystander"
SMALL = LlamaShape(hidden_size=64, intermediate_size=160, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=128)  # fmt: skip

pytestmark = pytest.mark.timeout(60)


def _damage_mid_stream(
    root: Path,
    serve: ServeFn,
    proxy: Callable[..., FaultProxy],
    slow_client: Callable[[str], WeightClient],
    damage: Callable[[Path], None],
) -> BackgroundServer:
    """Hold a fetch of MID_MODEL early, `damage` its last file, and check what follows."""
    write_llama_checkpoint(root / BYSTANDER, SMALL, num_files=1)
    server = serve(root, chunk_bytes=CHUNK)
    victim = sorted((root / MID_MODEL).glob("*.safetensors"))[-1]  # streamed last
    link = proxy(server.server.port)
    with slow_client(link.address) as client:
        link.pause_after(HELD_AT)
        fetch = Background(lambda: client.fetch_state_dict(MID_MODEL))
        assert link.paused.wait(30), "the stream never started"
        damage(victim)
        link.resume()
        with pytest.raises(FetchError) as caught:
            fetch.result(timeout=30)
    assert caught.value.code() == grpc.StatusCode.DATA_LOSS, caught.value
    assert victim.name in str(caught.value), caught.value

    with WeightClient(server.address) as other:  # the server still serves everyone else
        assert {m.name for m in other.list_models()} == {MID_MODEL, BYSTANDER}
        state = other.fetch_state_dict(BYSTANDER)
    assert_bit_identical(state, load_checkpoint(root / BYSTANDER))
    return server


@pytest.mark.fault("checkpoint file truncated while served")
def test_truncated_mid_stream_is_data_loss(
    mid_root: Path,
    serve: ServeFn,
    proxy: Callable[..., FaultProxy],
    slow_client: Callable[[str], WeightClient],
) -> None:
    def truncate(path: Path) -> None:
        os.truncate(path, path.stat().st_size // 2)

    server = _damage_mid_stream(mid_root, serve, proxy, slow_client, truncate)
    # a new fetch is refused cleanly, not served short
    with WeightClient(server.address) as client, pytest.raises(FetchError) as caught:
        client.fetch_state_dict(MID_MODEL)
    assert caught.value.code() == grpc.StatusCode.DATA_LOSS, caught.value


@pytest.mark.fault("checkpoint file rewritten in place while served")
@pytest.mark.parametrize("restore_mtime", [False, True], ids=["mtime-moves", "mtime-set-back"])
def test_rewritten_in_place_mid_stream_is_data_loss(
    mid_root: Path,
    serve: ServeFn,
    proxy: Callable[..., FaultProxy],
    slow_client: Callable[[str], WeightClient],
    restore_mtime: bool,
) -> None:
    """Same size, same inode, other bytes; with the mtime set back too, only the ctime (which no
    user can set) shows the change, and it must still cost the stream a DATA_LOSS, never mixed bytes."""

    def rewrite(path: Path) -> None:
        before = path.stat()
        with path.open("r+b") as f:
            f.seek(before.st_size - 65536)
            old = f.read(65536)
            f.seek(before.st_size - 65536)
            f.write(bytes(b ^ 0x5A for b in old))
            f.flush()
            os.fsync(f.fileno())
        if restore_mtime:
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = path.stat()
        assert (after.st_size, after.st_ino) == (before.st_size, before.st_ino)
        assert (after.st_mtime_ns == before.st_mtime_ns) == restore_mtime

    server = _damage_mid_stream(mid_root, serve, proxy, slow_client, rewrite)
    # the next fetch sees a new revision and serves the new bytes whole
    with WeightClient(server.address) as client:
        assert_bit_identical(client.fetch_state_dict(MID_MODEL), load_checkpoint(mid_root / MID_MODEL))


@pytest.mark.fault(
    "checkpoint file replaced by rename while served",
    expect="streams in flight finish with the old bytes; the next fetch is the new revision",
)
def test_replaced_by_rename_mid_stream_finishes_with_the_old_bytes(
    mid_root: Path,
    serve: ServeFn,
    proxy: Callable[..., FaultProxy],
    slow_client: Callable[[str], WeightClient],
) -> None:
    """A rollout writes the new file beside the old and renames it over: the old inode stays whole."""
    old = load_checkpoint(mid_root / MID_MODEL)
    server = serve(mid_root, chunk_bytes=CHUNK)
    victim = sorted((mid_root / MID_MODEL).glob("*.safetensors"))[-1]  # streamed last
    link = proxy(server.server.port)
    with slow_client(link.address) as client:
        link.pause_after(HELD_AT)
        fetch = Background(lambda: client.fetch_state_dict(MID_MODEL))
        assert link.paused.wait(30), "the stream never started"
        data = bytearray(victim.read_bytes())
        data[-65536:] = bytes(b ^ 0x5A for b in data[-65536:])
        fresh = victim.with_name(f".{victim.name}.new")
        fresh.write_bytes(data)
        os.replace(fresh, victim)
        link.resume()
        assert_bit_identical(fetch.result(timeout=30), old)
    with WeightClient(server.address) as other:  # the next fetch is the new revision, whole
        new = other.fetch_state_dict(MID_MODEL)
    assert_bit_identical(new, load_checkpoint(mid_root / MID_MODEL))
    assert any(not torch.equal(new[k], old[k]) for k in old), "the replacement changed nothing"


@pytest.mark.fault("checkpoint file truncated while served")
def test_damaged_stream_leaves_no_unretrieved_read_errors(
    mid_root: Path,
    serve: ServeFn,
    proxy: Callable[..., FaultProxy],
    slow_client: Callable[[str], WeightClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The DATA_LOSS is the whole story: no read-ahead future is left holding the same error.

    A read that fails after the one the stream awaited is still the stream's to retrieve
    (or cancel); left alone, asyncio logs "... exception was never retrieved" with a
    traceback at some later garbage collection, an ERROR line for a handled condition.
    """

    def truncate(path: Path) -> None:
        os.truncate(path, path.stat().st_size // 2)

    caplog.set_level(logging.ERROR, logger="asyncio")
    _damage_mid_stream(mid_root, serve, proxy, slow_client, truncate)
    gc.collect()
    leaked = [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]
    assert not leaked, f"the server left failed reads unretrieved: {leaked}"
