"""Serving a published version: the checkpoint's loader with the version's tensors swapped in.

Each tensor the version changed reads from its blob (a file of the tensor's bytes);
every other tensor reads from the checkpoint as version 0 does. Nothing else changes,
so every plan (TP, PP, EP, layouts) and both transports serve versions unchanged. A
blob is checked against the crc32c recorded when it was published before it is
served: a stored version that was damaged on disk is refused (DATA_LOSS), never sent.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from weightserve import wire
from weightserve.errors import CorruptCheckpointError, PreconditionError
from weightserve.loaders.base import Loader, TensorRecord
from weightserve.loaders.sources import FileSource
from weightserve.state.version_store import Version

CHECK_BLOCK = 8 << 20


class VersionLoader(Loader):
    """A checkpoint's loader with a version's blobs in place of the tensors it changed."""

    name = "version"

    def __init__(self, base: Loader, version: Version, blob_path: Callable[[str], Path]) -> None:
        super().__init__(base.files)
        self.base = base
        self.version = version
        self.sources = list(base.sources)
        if base.sharded_state is not None:
            raise PreconditionError("versions are published over canonical checkpoints, not saved shards")
        blobs: dict[str, int] = {}
        records = []
        for record in base.records:
            stored = version.tensors.get(record.name)
            if stored is None:
                records.append(record)
                continue
            if record.quant or (stored.dtype, stored.shape) != (record.dtype, record.shape):
                raise CorruptCheckpointError(
                    f"version {version.version} of {version.model}: {record.name} is {stored.dtype} "
                    f"{list(stored.shape)} but the checkpoint's is {record.dtype} {list(record.shape)}"
                )
            index = blobs.get(stored.blob)
            if index is None:
                index = blobs[stored.blob] = len(self.sources)
                self.sources.append(_open_blob(blob_path(stored.blob), stored.nbytes, stored.crc32c, record.name))
            records.append(TensorRecord(record.name, stored.dtype, stored.shape, index, 0, stored.nbytes))
        self.records = records

    @classmethod
    def find_files(cls, model_dir: Path) -> list[Path]:
        return []  # never found in a directory: made from a checkpoint's loader

    def model_config_dict(self) -> dict[str, Any] | None:
        return self.base.model_config_dict()


def _open_blob(path: Path, nbytes: int, crc: int, name: str) -> FileSource:
    """A blob opened and checked against its published size and crc32c."""
    try:
        source = FileSource(path)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"the stored bytes of {name} are missing") from None
    try:
        if source.size != nbytes:
            raise CorruptCheckpointError(f"the stored bytes of {name} are {source.size}, not {nbytes}")
        buf = bytearray(CHECK_BLOCK)
        running, done = 0, 0
        while done < nbytes:
            view = memoryview(buf)[: min(CHECK_BLOCK, nbytes - done)]
            source.read_into(done, view)
            running = wire.crc32c(view, running)
            done += len(view)
        if running != crc:
            raise CorruptCheckpointError(
                f"the stored bytes of {name} fail their crc32c: the version was damaged on disk"
            )
    except BaseException:
        source.close()
        raise
    return source
