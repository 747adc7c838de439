"""`.pt` / `.bin` checkpoints, loaded with torch.load(weights_only=True).

Zip-format files are opened with mmap=True only to learn each tensor's storage;
every byte is then read with pread from the file itself, like safetensors, so a
truncated file is a DATA_LOSS and never a SIGBUS. Legacy (pre-zip) files cannot be
mapped and are held in memory, as are non-contiguous tensors of either kind (they have
no byte range to serve); torch_views.py bounds what that copy may cost before it is
made. A pickle that asks for anything but tensors is refused by torch's weights-only
unpickler before any of it runs. A file the server may not read is a PreconditionError
(loaders/access.py), never DATA_LOSS.
"""

from __future__ import annotations

import logging
import pickle
import struct
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from weightserve.errors import CorruptCheckpointError, UnsafeCheckpointError, WeightserveError
from weightserve.loaders import register_loader
from weightserve.loaders.access import reading, without_dirs
from weightserve.loaders.base import Loader, TensorRecord
from weightserve.loaders.discovery import check_index, files_by_suffix, files_from_index
from weightserve.loaders.sources import FileSource, MemorySource
from weightserve.loaders.torch_views import View, check_views
from weightserve.storage.selection import TORCH_INDEX
from weightserve.wire import dtype_name

logger = logging.getLogger(__name__)

INDEX_NAME = TORCH_INDEX
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # zip local file header, 30 bytes
_WRAPPER_KEYS = ("state_dict", "model", "module")
MAX_DEPTH = 64
"""Deepest nesting of dicts a checkpoint may have; state dicts use a few levels."""


def _tensors(obj: Any, label: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Flatten a loaded checkpoint into (name, tensor), unwrapping {'state_dict': ...}.

    Iterative, each dict entered once, at most MAX_DEPTH deep: the unpickler can build
    dicts nested past Python's recursion limit, a dict that holds itself, or one dict
    reached by 2**60 paths through memo references, which would crash, loop forever or
    never finish. A state dict is a shallow tree; anything else is corrupt.

    Raises:
        CorruptCheckpointError: a dict reached twice, or nesting deeper than MAX_DEPTH.
    """
    if not isinstance(obj, Mapping):
        return
    seen: set[int] = set()

    def enter(mapping: Mapping[Any, Any], prefix: str) -> tuple[str, Iterator[tuple[Any, Any]]]:
        while True:
            where = prefix.rstrip(".") or "the top level"
            if id(mapping) in seen:
                raise CorruptCheckpointError(f"{label}: the dict at {where!r} is reached twice; a state dict is a tree")
            seen.add(id(mapping))
            first = next(iter(mapping.items()), None)
            if len(mapping) == 1 and first is not None and first[0] in _WRAPPER_KEYS and isinstance(first[1], Mapping):
                mapping = first[1]
                continue
            return prefix, iter(mapping.items())

    stack = [enter(obj, "")]
    while stack:
        prefix, items = stack[-1]
        for key, value in items:
            if isinstance(value, torch.Tensor):
                yield f"{prefix}{key}", value
            elif isinstance(value, Mapping):
                if len(stack) >= MAX_DEPTH:
                    raise CorruptCheckpointError(f"{label}: dicts nested more than {MAX_DEPTH} deep")
                stack.append(enter(value, f"{prefix}{key}."))
                break
            else:
                logger.debug("skipping non-tensor entry %s%s (%s)", prefix, key, type(value).__name__)
        else:
            stack.pop()


def _load(path: Path, mmap: bool) -> Any:
    try:
        with reading(path):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise _refusal(path, e) from None
    except WeightserveError:
        raise
    except Exception as e:  # torch raises many types for a damaged file
        raise CorruptCheckpointError(
            f"{path.name}: cannot read torch checkpoint: {without_dirs(str(e), path)}"
        ) from None


def _views(loaded: list[tuple[str, torch.Tensor]]) -> Iterator[View]:
    for name, tensor in loaded:
        yield View(
            name,
            int(tensor.storage_offset()),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.element_size(),
            tensor.untyped_storage().nbytes(),
            tensor.is_contiguous(),
        )


def _refusal(path: Path, error: pickle.UnpicklingError) -> CorruptCheckpointError | UnsafeCheckpointError:
    """Why the weights-only unpickler refused `path`: globals it would run, or bytes that are no pickle.

    torch names the offending globals itself (`get_unsafe_globals_in_checkpoint`, torch >= 2.5)
    for files written by torch.save's zip format; only for legacy files, which that API cannot
    read, is torch's error text the evidence.
    """
    unsafe = _unsafe_globals(path)
    if unsafe is None:
        unsafe = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line or "Unsupported class" in line]
    if not unsafe:
        return CorruptCheckpointError(f"{path.name}: not a valid torch checkpoint ({without_dirs(str(error), path)})")
    shown = ", ".join(unsafe[:3]) + (f" and {len(unsafe) - 3} more" if len(unsafe) > 3 else "")
    return UnsafeCheckpointError(
        f"{path.name}: refusing to unpickle: it holds more than plain tensors ({shown}). "
        "Convert it to safetensors with a trusted tool first."
    )


def _unsafe_globals(path: Path) -> list[str] | None:
    """The globals torch's API finds outside its weights-only allowlist; None where it cannot say."""
    find = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    try:
        if find is None or not zipfile.is_zipfile(path):
            return None
        return [str(name) for name in find(path)]
    except Exception:  # a damaged archive: no answer from the API
        return None


def _is_zip(path: Path) -> bool:
    """Whether `path` is a zip (torch.save's default format) rather than a legacy pickle.

    Raises:
        CorruptCheckpointError: it ends in a zip directory that zipfile refuses to read.
    """
    try:
        return zipfile.is_zipfile(path)
    except zipfile.BadZipFile as e:  # is_zipfile answers only for what it can parse
        raise CorruptCheckpointError(f"{path.name}: its zip directory is damaged ({e})") from None


def _storage_offsets(path: Path) -> dict[int, int]:
    """Map each stored data entry's file offset to its byte size.

    Python's zipfile is stricter than torch's reader: a file torch loaded may still have
    a directory zipfile refuses, which is corruption, not a server error.
    """
    try:
        with reading(path), zipfile.ZipFile(path) as archive, path.open("rb") as f:
            return _entry_offsets(path, archive, f)
    except WeightserveError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, ValueError, struct.error) as e:
        raise CorruptCheckpointError(f"{path.name}: its zip directory is damaged ({e})") from None
    except OSError as e:  # its strerror only: str(e) may hold the server's full path
        raise CorruptCheckpointError(f"{path.name}: its zip directory is damaged ({e.strerror})") from None


def _entry_offsets(path: Path, archive: zipfile.ZipFile, f: BinaryIO) -> dict[int, int]:
    offsets: dict[int, int] = {}
    for info in archive.infolist():
        parts = info.filename.split("/")
        if len(parts) < 2 or parts[-2] != "data" or not parts[-1].isdigit():
            continue
        if info.compress_type != zipfile.ZIP_STORED:
            raise CorruptCheckpointError(f"{path.name}: storage {info.filename} is compressed")
        f.seek(info.header_offset)
        fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
        name_len, extra_len = fields[-2], fields[-1]
        offsets[info.header_offset + _LOCAL_HEADER.size + name_len + extra_len] = info.file_size
    return offsets


def _mapping_base(storages: list[torch.UntypedStorage], offsets: dict[int, int]) -> int:
    """The address at which torch mapped the file, from storage pointers and zip offsets.

    Every mmap-backed storage points at base + (its entry's file offset); the one base
    that puts all of them on an entry of the right size is the answer.
    """
    live = [s for s in storages if s.nbytes() > 0]
    if not live:
        return 0
    first = live[0]
    for file_offset, size in offsets.items():
        if size != first.nbytes():
            continue
        base = first.data_ptr() - file_offset
        if all(offsets.get(s.data_ptr() - base) == s.nbytes() for s in live):
            return base
    raise CorruptCheckpointError("cannot place the checkpoint's storages in its zip entries")


@register_loader("torch")
class TorchLoader(Loader):
    """Serves `pytorch_model*.bin`, `*.pt`, `*.pth` checkpoints."""

    def __init__(self, files: list[Path]) -> None:
        super().__init__(files)
        file_of: dict[str, str] = {}
        try:
            for path in files:
                first = len(self.records)
                source = FileSource(path)  # first: is_zipfile calls an unreadable file "not a zip"
                self.sources.append(source)  # closed with the others if anything below raises
                if _is_zip(path):
                    self._add_zip(path, source)
                else:
                    self.sources.pop().close()  # a legacy file's tensors are held in memory
                    self._add_legacy(path, source.size)
                file_of.update(dict.fromkeys((r.name for r in self.records[first:]), path.name))
            self._check_unique_names()
            if files:
                check_index(files[0].parent, INDEX_NAME, file_of)
        except BaseException:
            self.close()
            raise

    def _add_zip(self, path: Path, source: FileSource) -> None:
        index = self.sources.index(source)
        loaded = list(_tensors(_load(path, mmap=True), path.name))
        check_views(path.name, _views(loaded), source.size)
        offsets = _storage_offsets(path)
        base = _mapping_base([t.untyped_storage() for _, t in loaded], offsets)
        for name, tensor in loaded:
            dtype = dtype_name(tensor.dtype)
            nbytes = tensor.numel() * tensor.element_size()
            if tensor.is_contiguous() and nbytes:
                start = (
                    tensor.untyped_storage().data_ptr() - base + int(tensor.storage_offset()) * tensor.element_size()
                )
                self.records.append(TensorRecord(name, dtype, tuple(tensor.shape), index, start, nbytes))
            else:
                self._add_in_memory(f"{path.name}:{name}", name, tensor)
        del loaded  # drop the mapping; reads go through pread from here on

    def _add_legacy(self, path: Path, file_size: int) -> None:
        logger.info("%s is a legacy (non-zip) torch file; holding its tensors in memory", path)
        loaded = list(_tensors(_load(path, mmap=False), path.name))
        check_views(path.name, _views(loaded), file_size)
        for name, tensor in loaded:
            self._add_in_memory(f"{path.name}:{name}", name, tensor)

    def _add_in_memory(self, label: str, name: str, tensor: torch.Tensor) -> None:
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.sources.append(MemorySource(label, flat))
        self.records.append(
            TensorRecord(name, dtype_name(tensor.dtype), tuple(tensor.shape), len(self.sources) - 1, 0, flat.nbytes)
        )

    @classmethod
    def find_files(cls, model_dir: Path) -> list[Path]:
        indexed = files_from_index(model_dir, INDEX_NAME)
        if indexed is not None:
            return indexed
        return files_by_suffix(model_dir, (".bin", ".pt", ".pth"))
