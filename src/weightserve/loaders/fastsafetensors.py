"""Safetensors files bulk-read into host memory by fastsafetensors.

An optional reader of the safetensors format (`serve --loader fastsafetensors`): it
reads whole files into host memory at once (fastsafetensors' CPU path, pread through a
bounce buffer, no GPUDirect Storage) and the server then serves records from memory.
The headers are still checked by our own parser first, so a hostile file gets the
same errors as with the default loader. The whole model stays in memory while the
entry is open, outside the cache's chunk budget. On a CPU-only host it is slower than
the default loader (benchmarks/loaders.py), which is why it is not the default.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from weightserve.errors import PreconditionError
from weightserve.loaders import register_loader
from weightserve.loaders.base import Loader, TensorRecord
from weightserve.loaders.safetensors import HeaderEntry, SafetensorsLoader, read_header
from weightserve.loaders.sources import FileSource, MemorySource

EXTRA = "pip install 'weightserve[fastsafetensors]'"


def import_fastsafetensors() -> ModuleType:
    """The fastsafetensors package, imported on first use.

    Raises:
        PreconditionError: it is not installed (names the extra to install).
    """
    try:
        import fastsafetensors
    except ImportError:
        raise PreconditionError(f"the fastsafetensors loader needs the fastsafetensors package: {EXTRA}") from None
    module: ModuleType = fastsafetensors
    return module


def _entries(path: Path) -> list[HeaderEntry]:
    source = FileSource(path)
    try:
        return read_header(source)[0]
    finally:
        source.close()


@register_loader("fastsafetensors")
class FastSafetensorsLoader(Loader):
    """The files SafetensorsLoader would serve, read in bulk; one memory source per tensor."""

    def __init__(self, files: list[Path]) -> None:
        super().__init__(files)
        fst = import_fastsafetensors()
        headers = [_entries(path) for path in files]
        loader = fst.SafeTensorsFileLoader(None, "cpu", nogds=True, set_numa=False)
        try:
            loader.add_filenames({0: [str(p) for p in files]})
            buffers = loader.copy_files_to_device()
            try:
                for entry in (e for entries in headers for e in entries):
                    data = np.empty(0, dtype=np.uint8)
                    if entry.end > entry.begin:  # the buffer's tensors outlive buffers.close()
                        data = buffers.get_tensor(entry.name).contiguous().reshape(-1).view(torch.uint8).numpy()
                    self.sources.append(MemorySource(f"{entry.name} (fastsafetensors)", data))
                    self.records.append(
                        TensorRecord(entry.name, entry.dtype, entry.shape, len(self.sources) - 1, 0, data.nbytes)
                    )
            finally:
                buffers.close()
        finally:
            loader.close()
        self._check_unique_names()

    @classmethod
    def find_files(cls, model_dir: Path) -> list[Path]:
        return SafetensorsLoader.find_files(model_dir)
