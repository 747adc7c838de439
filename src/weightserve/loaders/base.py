"""The narrow waist: every checkpoint format becomes TensorRecords over Sources."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

from weightserve.errors import CorruptCheckpointError
from weightserve.loaders.sources import Source
from weightserve.wire import DTYPE_SIZES


@dataclass(frozen=True)
class TensorRecord:
    """One tensor as a byte range of a source; nothing is read until asked."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: int
    offset: int
    nbytes: int
    quant: str = ""
    """For a quantized tensor held as U8 [..., bytes per row]: its type (GGUF's "Q4_K"); else ""."""
    block_bytes: int = 0
    """Bytes of one quantization block; a split of the last dim must fall on a multiple of it."""

    def __post_init__(self) -> None:
        expected = math.prod(self.shape) * DTYPE_SIZES[self.dtype]
        if expected != self.nbytes:
            raise CorruptCheckpointError(
                f"tensor {self.name!r}: shape {list(self.shape)} x {self.dtype} is {expected} bytes, "
                f"but its byte range holds {self.nbytes}"
            )


@dataclass(frozen=True)
class ShardedState:
    """A checkpoint already saved per rank (vLLM's sharded_state format).

    Such a checkpoint is served file-for-file to the world size it was saved for.
    """

    world_size: int
    layout: str
    records_by_rank: tuple[tuple[TensorRecord, ...], ...]
    digests: dict[int, dict[str, int]] = field(default_factory=dict)
    """rank -> tensor name -> crc32c, as `weightserve shard` recorded them (empty for vLLM's own saves)."""


class Loader(ABC):
    """Opens one checkpoint (a list of weight files) and describes its tensors.

    Used as a context manager; `close()` releases file descriptors. Records keep the
    file's order; sources are read with `Source.read_into`.
    """

    name: ClassVar[str]
    sharded_state: ShardedState | None = None
    """Set by the loader of sharded_state directories; None for canonical checkpoints."""
    owns_config: ClassVar[bool] = False
    """Whether `model_config_dict()` is the model's config even beside a config.json (dummy)."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.sources: list[Source] = []
        self.records: list[TensorRecord] = []

    @classmethod
    @abstractmethod
    def find_files(cls, model_dir: Path) -> list[Path]:
        """The weight files this loader would serve from `model_dir` (empty if none)."""

    def __enter__(self) -> Loader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close every source."""
        for source in self.sources:
            source.close()

    def model_config_dict(self) -> dict[str, Any] | None:
        """A config.json-equivalent dict from the checkpoint itself (GGUF metadata), or None.

        Used only when the model directory has no config.json.
        """
        return None

    @classmethod
    def served_bytes(cls, files: list[Path]) -> int | None:
        """Bytes the model serves when that is not the files' size (generated weights); else None."""
        return None

    def total_bytes(self) -> int:
        """Sum of every tensor's byte size."""
        return sum(r.nbytes for r in self.records)

    def _check_unique_names(self) -> None:
        seen: dict[str, int] = {}
        for record in self.records:
            if record.name in seen:
                files = {self.sources[seen[record.name]].label, self.sources[record.source].label}
                raise CorruptCheckpointError(f"tensor {record.name!r} appears twice (in {sorted(files)})")
            seen[record.name] = record.source
