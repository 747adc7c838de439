"""Dummy weights: deterministic random tensors generated from a config.json alone.

For load tests without real checkpoints (`weightserve serve --dummy NAME=CONFIG.json`).
Element i of a tensor is the i-th output of splitmix64 seeded from a SHA-256 of the
tensor's name, mapped to [-1e-3, 1e-3] and rounded to the config's torch_dtype. The
generator is counter-based, so any byte range is computed without the rest of the
tensor, and every rank and every server process sees slices of the same tensors.

A dummy model is the operator's config file and nothing else: `dummy_locations` names
it for the storage router (after the real model roots, which win a clash), with a
revision hashed from the config's bytes so every server process agrees on it, and the
"dummy" loader serves it. Nothing is written to disk.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from weightserve.errors import CorruptCheckpointError, WeightserveError
from weightserve.loaders import register_loader
from weightserve.loaders.access import read_text
from weightserve.loaders.base import Loader, TensorRecord
from weightserve.loaders.dummy_shapes import config_dtype, tensor_shapes
from weightserve.loaders.sources import Source
from weightserve.storage.base import ModelLocation
from weightserve.wire import DTYPE_SIZES

BOUND = 1e-3
BLOCK_ELEMENTS = 1 << 16
"""Elements generated at a time: scratch arrays that stay in cache (2.5x faster than 1M)."""

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def name_seed(name: str) -> int:
    """A stable 64-bit seed for a tensor name (not Python's per-process hash())."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def splitmix64(seed: int, start: int, stop: int) -> npt.NDArray[np.uint64]:
    """Outputs start..stop-1 of the splitmix64 stream seeded with `seed` (wrapping uint64)."""
    z = np.arange(start + 1, stop + 1, dtype=np.uint64)
    z *= _GAMMA
    z += np.uint64(seed)
    z ^= z >> np.uint64(30)
    z *= _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)
    return z


def _bound(dtype: str) -> float:
    """The largest `dtype` value at most BOUND: values scaled to it never round past BOUND."""
    if dtype == "BF16":  # bfloat16 is float32's top half: truncating rounds a positive value down
        return float((np.array([BOUND], np.float32).view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)[0])
    kind = {"F16": np.float16, "F32": np.float32}[dtype]
    value = kind(BOUND)
    return float(value if float(value) <= BOUND else np.nextafter(value, kind(0)))


def dummy_values(seed: int, start: int, stop: int, dtype: str) -> npt.NDArray[np.uint8]:
    """The bytes of elements start..stop-1 of a dummy tensor: `dtype` values in [-1e-3, 1e-3].

    The top 24 bits of each output make a float32 exactly; scaling and rounding are
    IEEE float32 and numpy's round-to-nearest-even (bfloat16 by the same rule on float32
    bits), so the bytes depend on neither the platform nor the torch version.
    """
    bound = _bound(dtype)
    values = (splitmix64(seed, start, stop) >> np.uint64(40)).astype(np.float32)
    values *= np.float32(2 * bound / 2**24)
    values -= np.float32(bound)
    if dtype == "BF16":
        bits = values.view(np.uint32)
        bits += np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        out: npt.NDArray[np.uint8] = (bits >> np.uint32(16)).astype(np.uint16).view(np.uint8)
    elif dtype == "F16":
        out = values.astype(np.float16).view(np.uint8)
    else:
        out = values.view(np.uint8)
    return out


class DummySource(Source):
    """A tensor's bytes, generated for the range asked."""

    def __init__(self, name: str, dtype: str, numel: int) -> None:
        self.label = f"dummy:{name}"
        self.seed = name_seed(name)
        self.dtype = dtype
        self.size = numel * DTYPE_SIZES[dtype]
        self.bytes_read = 0

    def read_into(self, offset: int, dest: memoryview, check: bool = True) -> None:
        end = offset + len(dest)
        if offset < 0 or end > self.size:
            raise CorruptCheckpointError(f"{self.label}: read of [{offset}, {end}) past {self.size} bytes")
        itemsize = DTYPE_SIZES[self.dtype]
        out = np.frombuffer(dest, dtype=np.uint8)
        at = offset
        while at < end:
            first = at // itemsize
            stop = min(-(-end // itemsize), first + BLOCK_ELEMENTS)
            raw = dummy_values(self.seed, first, stop, self.dtype)
            lo, hi = at - first * itemsize, min(end, stop * itemsize) - first * itemsize
            out[at - offset : at - offset + hi - lo] = raw[lo:hi]
            at += hi - lo
        self.bytes_read += len(dest)


def read_config(path: Path) -> dict[str, Any]:
    """A config.json as a dict, checked to describe a model dummy weights cover.

    Messages name the file by its base name only: a client sees them.

    Raises:
        CorruptCheckpointError: not JSON, or not a supported model.
        PreconditionError: the server may not read it.
    """
    try:
        config = json.loads(read_text(path))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        tensor_shapes(config)
        config_dtype(config)
    except OSError as e:  # its strerror only: str(e) holds the server's full path
        raise CorruptCheckpointError(f"{path.name}: cannot read it ({e.strerror})") from None
    except (ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"{path.name}: {e}") from None
    return config


@register_loader("dummy")
class DummyLoader(Loader):
    """Serves generated tensors for one config.json (`files` is that one file)."""

    owns_config: ClassVar[bool] = True

    def __init__(self, files: list[Path]) -> None:
        super().__init__(files)
        self.config = read_config(files[0])
        dtype = config_dtype(self.config)
        for name, shape in tensor_shapes(self.config).items():
            self.sources.append(DummySource(name, dtype, math.prod(shape)))
            nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
            self.records.append(TensorRecord(name, dtype, shape, len(self.sources) - 1, 0, nbytes))

    def model_config_dict(self) -> dict[str, Any] | None:
        return self.config

    @classmethod
    def find_files(cls, model_dir: Path) -> list[Path]:
        return []  # never found by scanning a directory: dummy_locations names each model

    @classmethod
    def served_bytes(cls, files: list[Path]) -> int | None:
        config = read_config(files[0])
        size = DTYPE_SIZES[config_dtype(config)]
        return sum(math.prod(shape) * size for shape in tensor_shapes(config).values())


def dummy_locations(models: Iterable[tuple[str, Path]]) -> dict[str, ModelLocation]:
    """Where each (NAME, config.json) dummy model is, for the storage router.

    The revision is a hash of the config's bytes, so it is the same in every server
    process given the same config, and changes when the config does.

    Raises:
        ValueError: a name that is not a relative path of at most 3 parts, a name given
            twice, or a config that is unreadable or describes no supported model.
    """
    found: dict[str, ModelLocation] = {}
    for name, config_path in models:
        rel = PurePosixPath(name)
        if name in found:
            raise ValueError(f"dummy model {name!r} is given twice")
        if (
            not name
            or "\\" in name
            or rel.is_absolute()
            or len(rel.parts) > 3
            or any(p in ("", "..") or p[0] == "." for p in rel.parts)
        ):
            raise ValueError(f"dummy model name {name!r} must be a relative path of at most 3 parts, like org/model")
        try:
            read_config(config_path)
            text = config_path.read_bytes()
        except (WeightserveError, OSError) as e:
            raise ValueError(f"dummy model {name!r}: {e}") from None
        revision = "dummy-" + hashlib.sha256(text).hexdigest()[:20]
        path = config_path.resolve()
        found[name] = ModelLocation(
            "dummy", name, path.parent, revision, format="dummy", files=(("config.json", path),)
        )
    return found
