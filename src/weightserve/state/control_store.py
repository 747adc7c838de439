"""Expert mappings and load windows on disk, so a restarted server answers as before.

Under `<state dir>/control/<model key>/`: each published mapping is `m<version>.json`,
written once and atomically when it is published (a worker may hold any kept version,
so each is kept until the history drops it); the load window is `load.safetensors`, a
snapshot taken periodically and at shutdown (never per report), with the window's
reports as one int64 tensor and the report sequences in its metadata. safetensors and
JSON, never pickle: a state dir is data, and reading it must not run code.

A file that cannot be read is logged and skipped: the server starts with less state
(version 0, an empty window) rather than not at all, and refuses what it cannot prove.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from weightserve.atomic import atomic_write
from weightserve.eplb import ExpertMapping, Topology
from weightserve.state.load import MAX_COUNT, LoadWindow, ReportSequences
from weightserve.state.version_store import model_key

logger = logging.getLogger(__name__)

_MAPPING_FILE = re.compile(r"^m(\d+)\.json$")
LOAD_FILE = "load.safetensors"


@dataclass
class SavedLoad:
    """A model's load window and report sequences as last snapshotted."""

    window: LoadWindow
    sequences: ReportSequences
    last_report_wall: float


class ControlStore:
    """Reads and writes the control state of every model under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _folder(self, model: str) -> Path:
        return self.root / model_key(model)

    def _named(self, folder: Path) -> str | None:
        name_file = folder / "model.txt"
        return name_file.read_text() if name_file.is_file() else None

    def _claim(self, model: str) -> Path:
        folder = self._folder(model)
        if not (folder / "model.txt").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(folder / "model.txt", lambda p: p.write_text(model))
        return folder

    # ----------------------------------------------------------------- mappings

    def save_mapping(self, model: str, mapping: ExpertMapping, keep: list[int]) -> None:
        """Write a newly published mapping; delete the files of versions no longer in `keep`."""
        folder = self._claim(model)
        state = {
            "model": model,
            "version": mapping.version,
            "num_logical": mapping.num_logical,
            "topology": asdict(mapping.topology),
            "phy2log": mapping.phy2log.tolist(),
        }
        atomic_write(folder / f"m{mapping.version}.json", lambda p: p.write_text(json.dumps(state)))
        kept = set(keep)
        for path in folder.iterdir():
            match = _MAPPING_FILE.match(path.name)
            if match is not None and int(match.group(1)) not in kept:
                path.unlink(missing_ok=True)

    def load_mappings(self) -> dict[str, list[ExpertMapping]]:
        """Every model's kept mappings, oldest first."""
        found: dict[str, list[ExpertMapping]] = {}
        for folder in self._folders():
            model = self._named(folder)
            if model is None:
                continue
            mappings = []
            for path in folder.iterdir():
                if _MAPPING_FILE.match(path.name) is None:
                    continue
                try:
                    mappings.append(_mapping(json.loads(path.read_text()), model))
                except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
                    logger.error("ignoring expert mapping %s: %s", path, e)
            if mappings:
                found[model] = sorted(mappings, key=lambda m: m.version)
        return found

    # -------------------------------------------------------------- load windows

    def save_load(
        self, model: str, reports: Sequence[torch.Tensor], sequences: Mapping[int, int], last_report_wall: float
    ) -> None:
        """Snapshot one model's load window: its reports, and each EP rank's last sequence number.

        Atomic: a crash leaves the previous snapshot. The arguments are the caller's copies,
        taken where the window changes (the event loop); this runs on a worker thread.
        """
        folder = self._claim(model)
        stacked = torch.stack(list(reports)) if reports else torch.zeros(0, 0, 0, dtype=torch.int64)
        metadata = {
            "model": model,
            "sequences": json.dumps({str(rank): seq for rank, seq in sequences.items()}),
            "last_report_wall": repr(last_report_wall),
        }
        atomic_write(folder / LOAD_FILE, lambda p: save_file({"reports": stacked.contiguous()}, str(p), metadata))

    def load_loads(self, window_size: int) -> dict[str, SavedLoad]:
        """Every model's last snapshotted window (its newest `window_size` reports)."""
        found: dict[str, SavedLoad] = {}
        for folder in self._folders():
            model, path = self._named(folder), folder / LOAD_FILE
            if model is None or not path.is_file():
                continue
            try:
                found[model] = _load(path, model, window_size)
            except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
                logger.error("ignoring expert load snapshot %s: %s", path, e)
        return found

    def _folders(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []


def _mapping(state: dict[str, object], model: str) -> ExpertMapping:
    if state["model"] != model:
        raise ValueError(f"the file is of model {state['model']!r}")
    phy2log = torch.tensor(state["phy2log"], dtype=torch.int64)
    num_logical = int(state["num_logical"])  # type: ignore[call-overload]
    if phy2log.dim() != 2 or phy2log.numel() == 0 or int(phy2log.min()) < 0 or int(phy2log.max()) >= num_logical:
        raise ValueError("phy2log is not a [layers, slots] table of experts")
    topology = Topology(**state["topology"])  # type: ignore[arg-type]
    return ExpertMapping.from_phy2log(phy2log, num_logical, topology, int(state["version"]))  # type: ignore[call-overload]


def _load(path: Path, model: str, window_size: int) -> SavedLoad:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("model") != model:
            raise ValueError(f"the file is of model {metadata.get('model')!r}")
        reports = f.get_tensor("reports")
    if reports.dtype != torch.int64 or reports.dim() != 3:
        raise ValueError("reports are not an int64 [reports, layers, experts] tensor")
    if reports.numel() and (int(reports.min()) < 0 or int(reports.max()) > MAX_COUNT):
        raise ValueError("a count is outside [0, 2^48]")
    window = LoadWindow(window_size)
    for report in reports[-window_size:] if window_size else []:
        window.add(report.clone())
    sequences = ReportSequences()
    sequences.last.update({int(rank): int(seq) for rank, seq in json.loads(metadata["sequences"]).items()})
    return SavedLoad(window, sequences, float(metadata["last_report_wall"]))
