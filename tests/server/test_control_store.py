"""The control state on disk (state/control_store.py): round trips, and files that cannot be trusted."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from weightserve.eplb import ExpertMapping, Topology
from weightserve.server.control_plane import ControlPlane
from weightserve.state.control_store import LOAD_FILE, ControlStore
from weightserve.state.load import LoadWindow, ReportSequences
from weightserve.state.mappings import MappingHistory
from weightserve.state.version_store import model_key

MODEL = "org/moe"


def mapping(version: int, shift: int = 0) -> ExpertMapping:
    phy2log = (torch.arange(12) + shift).remainder(8).view(1, 12).repeat(2, 1)
    return ExpertMapping.from_phy2log(phy2log, 8, Topology(num_nodes=2, gpus_per_node=2, num_groups=2), version)


def test_mappings_round_trip_and_files_of_dropped_versions_go(tmp_path: Path) -> None:
    store = ControlStore(tmp_path)
    store.save_mapping(MODEL, mapping(1700000000000), keep=[1700000000000])
    store.save_mapping(MODEL, mapping(1700000000001, shift=3), keep=[1700000000001])
    (restored,) = store.load_mappings()[MODEL]
    assert restored.version == 1700000000001 and restored.topology == Topology(2, 2, 2)
    assert restored.phy2log.equal(mapping(0, shift=3).phy2log) and restored.logcnt.equal(mapping(0, 3).logcnt)
    history = MappingHistory()
    history.restore([restored])
    assert history.publish(mapping(0)).version > restored.version  # numbers keep growing after a restart


def test_a_load_window_round_trips_with_its_sequences(tmp_path: Path) -> None:
    store = ControlStore(tmp_path)
    window, sequences = LoadWindow(3), ReportSequences()
    for n in range(5):
        window.add(torch.full((2, 8), n, dtype=torch.int64))
        assert not sequences.is_retry(n % 2, n)
    store.save_load(MODEL, list(window.reports), sequences.last, 123.5)
    saved = store.load_loads(window_size=2)[MODEL]
    assert len(saved.window.reports) == 2 and saved.window.total is not None
    assert saved.window.total.equal(torch.full((2, 8), 3 + 4, dtype=torch.int64))
    assert saved.sequences.is_retry(0, 4) and not saved.sequences.is_retry(1, 4) and saved.last_report_wall == 123.5


@pytest.mark.fault("corrupt or hostile file in the state dir", expect="logged and skipped; the server starts")
def test_state_files_that_cannot_be_trusted_are_skipped_with_a_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = ControlStore(tmp_path)
    store.save_mapping(MODEL, mapping(5), keep=[5, 6, 7, 8])
    store.save_mapping("org/other", mapping(5), keep=[5])
    folder = tmp_path / model_key(MODEL)
    (folder / "m6.json").write_text("{not json")
    (folder / "m7.json").write_text((tmp_path / model_key("org/other") / "m5.json").read_text())  # another model's
    (folder / "m8.json").write_text((folder / "m5.json").read_text().replace('"phy2log": [[0', '"phy2log": [[-1'))
    save_file({"reports": torch.full((1, 2, 8), -5, dtype=torch.int64)}, str(folder / LOAD_FILE), {"model": MODEL})
    with caplog.at_level(logging.ERROR):
        mappings = store.load_mappings()
        loads = store.load_loads(10)
    assert [m.version for m in mappings[MODEL]] == [5] and MODEL not in loads
    skipped = [r.getMessage() for r in caplog.records]
    assert len(skipped) == 4 and all("ignoring" in line for line in skipped), skipped
    (folder / LOAD_FILE).write_bytes(b"\x00" * 7)
    assert MODEL not in store.load_loads(10)


def test_a_snapshot_writes_the_windows_as_copied_on_the_loop_not_as_they_are_later(tmp_path: Path) -> None:
    """keep_snapshots copies on the event loop and writes on a thread: reports counted
    meanwhile (the loop goes on) neither break the write nor slip into it."""
    control = ControlPlane(None, None, window=4, store=ControlStore(tmp_path))  # type: ignore[arg-type]
    window, sequences = LoadWindow(4), ReportSequences()
    control.windows[MODEL], control.sequences[MODEL] = window, sequences
    window.add(torch.ones((2, 8), dtype=torch.int64))
    assert not sequences.is_retry(0, 1)
    control._changed.add(MODEL)
    copies = control._changed_windows()
    for n in range(2, 7):  # what the loop counts while the thread writes
        window.add(torch.full((2, 8), n, dtype=torch.int64))
        assert not sequences.is_retry(n % 3, n)
    assert control._write_snapshots(copies) == 1
    saved = ControlStore(tmp_path).load_loads(window_size=4)[MODEL]
    assert len(saved.window.reports) == 1 and saved.window.total is not None
    assert saved.window.total.equal(torch.ones((2, 8), dtype=torch.int64))
    assert saved.sequences.is_retry(0, 1) and not saved.sequences.is_retry(1, 4)
