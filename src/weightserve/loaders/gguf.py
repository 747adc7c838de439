"""GGUF checkpoints (llama.cpp), described by the gguf package's GGUFReader.

The reader maps the file only to parse its header; every tensor byte is then read with
pread through a FileSource, like safetensors, so a truncated file is a DATA_LOSS and
never a SIGBUS. Tensors are served in numpy order (GGUF's `ne` reversed) under their
Hugging Face names: F32/F16/BF16 (and F64, integers) as tensors of that dtype, every
quantized type as U8 `[rows, bytes per row]` whose record carries the GGUF type. For
Llama, attn_q / attn_k rows are served un-permuted (gguf_rows.py). A split model
(`NAME-00001-of-00003.gguf`, ...) is one checkpoint; its first file holds the metadata.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from weightserve.errors import CorruptCheckpointError, PreconditionError
from weightserve.loaders import register_loader
from weightserve.loaders.access import reading, unreadable, without_dirs
from weightserve.loaders.base import Loader, TensorRecord
from weightserve.loaders.discovery import files_by_suffix
from weightserve.loaders.gguf_header import check_metadata
from weightserve.loaders.gguf_names import config_from_metadata, hf_name, permuted_heads
from weightserve.loaders.gguf_rows import PermutedRows
from weightserve.loaders.sources import FileSource

PLAIN_TYPES = {
    "F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64",
    "I8": "I8", "I16": "I16", "I32": "I32", "I64": "I64",
}  # fmt: skip
"""GGML types served as tensors of a wire dtype; every other type is quantized blocks."""

_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$")
_NOT_THE_MODEL = re.compile(r"^mmproj", re.IGNORECASE)  # a multimodal projector beside the LM
_warned: set[Path] = set()
logger = logging.getLogger(__name__)


def import_gguf() -> ModuleType:
    """The gguf package, imported on first use.

    Raises:
        PreconditionError: it is not installed (names the extra to install).
    """
    try:
        import gguf
    except ImportError:
        raise PreconditionError(
            "serving GGUF checkpoints needs the gguf package: pip install 'weightserve[gguf]'"
        ) from None
    return gguf


def gguf_files(model_dir: Path) -> list[Path]:
    """The `.gguf` files of one model: a single file, or every part of a split one.

    A directory holding several GGUF models (a repository's quantization variants)
    serves none of them, with a warning: choosing one would be a guess, and raising
    would fail every listing of the server's models.

    Raises:
        CorruptCheckpointError: a part of a split model is missing.
    """
    files = [p for p in files_by_suffix(model_dir, (".gguf",)) if not _NOT_THE_MODEL.match(p.name)]
    groups: dict[str, list[Path]] = {}
    for path in files:
        match = _SPLIT.match(path.name)
        groups.setdefault(f"{match['stem']}-*-of-{match['count']}.gguf" if match else path.name, []).append(path)
    if len(groups) > 1:
        if model_dir not in _warned:
            _warned.add(model_dir)
            logger.warning("%s holds several GGUF models (%s); serving none: keep one per directory",
                           model_dir.name, ", ".join(sorted(groups)))  # fmt: skip
        return []
    for pattern, parts in groups.items():
        match = _SPLIT.match(parts[0].name)
        if match is not None:
            numbers = sorted(int(_SPLIT.match(p.name)["part"]) for p in parts)  # type: ignore[index]
            count = int(match["count"])
            if numbers != list(range(1, count + 1)):
                raise CorruptCheckpointError(f"{model_dir.name}: {pattern} has parts {numbers}, not 1..{count}")
    return files


def _scalars(reader: Any, gguf: ModuleType) -> dict[str, Any]:
    """Metadata fields as Python values, leaving out arrays of over 1024 (vocabularies, merges)."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if field.types and (field.types[0] != gguf.GGUFValueType.ARRAY or len(field.data) <= 1024):
            out[key] = field.contents()
    return out


class GGUFTensor(NamedTuple):
    """What a GGUF header says about one tensor."""

    name: str
    ggml_type: str
    ne: list[int]
    nbytes: int
    offset: int


def _read(path: Path, gguf: ModuleType, size: int) -> tuple[list[GGUFTensor], dict[str, Any]]:
    with reading(path), path.open("rb") as f:
        check_metadata(f, size, path.name)  # before the reader, which loops on counts past the end
    try:
        reader = gguf.GGUFReader(path)
        tensors = [
            GGUFTensor(t.name, t.tensor_type.name, [int(d) for d in t.shape], int(t.n_bytes), int(t.data_offset))
            for t in reader.tensors
        ]
        metadata = _scalars(reader, gguf)
    except PermissionError:
        raise unreadable(path) from None
    except (ValueError, IndexError, KeyError, TypeError, OSError) as e:  # what the reader raises on bad bytes
        raise CorruptCheckpointError(f"{path.name}: not a valid GGUF file ({without_dirs(str(e), path)})") from None
    del reader  # drop the mapping: every read from here on is a pread
    return tensors, metadata


@register_loader("gguf")
class GGUFLoader(Loader):
    """Serves one GGUF model: a `.gguf` file or the parts of a split one.

    Attributes:
        metadata: the first file's metadata fields (arrays longer than 1024 left out).
        quant_types: Hugging Face name -> GGUF type, for every quantized tensor.
    """

    def __init__(self, files: list[Path]) -> None:
        super().__init__(files)
        gguf = import_gguf()
        self.metadata: dict[str, Any] = {}
        self.quant_types: dict[str, str] = {}
        try:
            for number, path in enumerate(files):
                self.sources.append(FileSource(path))
                index = len(self.sources) - 1
                tensors, metadata = _read(path, gguf, self.sources[index].size)
                if number == 0:
                    self.metadata = metadata
                self.records += [self._record(gguf, path, index, tensor) for tensor in tensors]
            self._check_unique_names()
        except BaseException:
            self.close()
            raise

    def _record(self, gguf: ModuleType, path: Path, index: int, tensor: GGUFTensor) -> TensorRecord:
        name, ggml_type, ne, nbytes, offset = tensor
        shape = tuple(reversed(ne))
        quant, block_bytes = "", 0
        if ggml_type in PLAIN_TYPES:
            dtype = PLAIN_TYPES[ggml_type]
        else:
            block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]]
            if not shape or shape[-1] % block:
                raise CorruptCheckpointError(f"{path.name}: {name!r} rows of {ne[:1]} are not whole {ggml_type} blocks")
            dtype, quant = "U8", ggml_type
            shape = (*shape[:-1], shape[-1] // block * block_bytes)
        source = self.sources[index]
        if offset + nbytes > source.size:
            raise CorruptCheckpointError(
                f"{path.name}: tensor {name!r} ends at byte {offset + nbytes}, "
                f"past the end of the file ({source.size} bytes)"
            )
        heads = permuted_heads(name, self.metadata) if shape and nbytes else 0  # no rows: nothing to reorder
        if heads:
            rows = PermutedRows(
                source,
                offset,
                n_rows=shape[0],
                row_bytes=nbytes // shape[0],
                n_head=heads,
                label=f"{path.name}:{name}",
            )
            self.sources.append(rows)
            index, offset = len(self.sources) - 1, 0
        hf = hf_name(name)
        if quant:
            self.quant_types[hf] = quant
        try:
            return TensorRecord(hf, dtype, shape, index, offset, nbytes, quant, block_bytes)
        except CorruptCheckpointError as e:
            raise CorruptCheckpointError(f"{path.name}: {e}") from None

    def model_config_dict(self) -> dict[str, Any] | None:
        return config_from_metadata(self.metadata, {r.name: r.shape for r in self.records})

    @classmethod
    def find_files(cls, model_dir: Path) -> list[Path]:
        return gguf_files(model_dir)
