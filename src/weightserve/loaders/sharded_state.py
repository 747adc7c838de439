"""Directories saved per rank (`model-rank-{rank}-part-{part}.safetensors`).

This is the file pattern vLLM's ShardedStateLoader reads and `weightserve shard`
writes. The server serves rank r's files as they are, to the world size they were
saved for. `weightserve-sharded.json` records that size, the tensor layout and each
tensor's crc32c (the manifest reports them and a stream that reads other bytes ends
in DATA_LOSS naming the tensor); a directory without it (saved by vLLM) is taken as
vLLM's run-time layout, with no checksums.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from weightserve.errors import CorruptCheckpointError
from weightserve.loaders import register_loader
from weightserve.loaders.access import read_text, reading
from weightserve.loaders.base import Loader, ShardedState, TensorRecord
from weightserve.loaders.discovery import natural_key
from weightserve.loaders.safetensors import read_header
from weightserve.loaders.sources import FileSource

METADATA_NAME = "weightserve-sharded.json"
INCOMPLETE_NAME = ".weightserve-sharded.incomplete"
"""Present while `weightserve shard` writes a directory; its metadata file is written last."""
RANK_FILE = re.compile(r"^model-rank-(\d+)-part-(\d+)\.safetensors$")


Digests = dict[int, dict[str, int]]
"""rank -> tensor name -> crc32c."""


def read_metadata(model_dir: Path, ranks_found: int) -> tuple[int, str, Digests]:
    """(world_size, layout, digests) from the metadata file, or inferred from the files (no digests).

    Raises:
        CorruptCheckpointError: the metadata is malformed, or was never finished.
        PreconditionError: the server may not read it.
    """
    path = model_dir / METADATA_NAME
    if not path.is_file():
        if (model_dir / INCOMPLETE_NAME).exists():
            raise CorruptCheckpointError(f"{model_dir.name}: `weightserve shard` did not finish writing it")
        return ranks_found, "vllm", {}
    try:
        meta = json.loads(read_text(path))
        world_size, layout = int(meta["world_size"]), str(meta["layout"])
        digests = {
            int(rank): {str(name): _crc(value) for name, value in tensors.items()}
            for rank, tensors in meta.get("crc32c", {}).items()
        }
    except OSError as e:  # its strerror only: str(e) holds the server's full path
        raise CorruptCheckpointError(f"{path.name}: cannot read it ({e.strerror})") from None
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError) as e:  # Overflow: Infinity
        raise CorruptCheckpointError(f"{path.name}: not valid sharded-state metadata ({e})") from None
    return world_size, layout, digests


def _crc(value: object) -> int:
    if type(value) is not int or not 0 <= value < 2**32:
        raise ValueError(f"crc32c {value!r} is not a 32-bit unsigned integer")
    return value


@register_loader("sharded_state")
class ShardedStateLoader(Loader):
    """Serves a per-rank directory file-for-file."""

    def __init__(self, files: list[Path]) -> None:
        super().__init__(files)
        by_rank: dict[int, list[TensorRecord]] = {}
        try:
            for path in files:
                match = RANK_FILE.match(path.name)
                assert match is not None  # find_files selected only such names
                source = FileSource(path)
                self.sources.append(source)
                index = len(self.sources) - 1
                entries, _ = read_header(source)
                by_rank.setdefault(int(match.group(1)), []).extend(
                    TensorRecord(e.name, e.dtype, e.shape, index, e.begin, e.end - e.begin) for e in entries
                )
            world_size, layout, digests = read_metadata(files[0].parent, len(by_rank))
            # the count first: a hostile world_size must not become a list of that many ranks
            if len(by_rank) != world_size or sorted(by_rank) != list(range(world_size)):
                raise CorruptCheckpointError(
                    f"{files[0].parent.name}: saved for world_size {world_size} "
                    f"but has files for ranks {sorted(by_rank)}"
                )
            for rank, records in by_rank.items():
                names = [r.name for r in records]
                if len(set(names)) != len(names):
                    raise CorruptCheckpointError(f"rank {rank}'s files repeat a tensor name")
            self.records = [r for rank in sorted(by_rank) for r in by_rank[rank]]
            for rank, named in digests.items():
                unknown = set(named) - {r.name for r in by_rank.get(rank, [])}
                if unknown:
                    raise CorruptCheckpointError(
                        f"{METADATA_NAME}: rank {rank} has checksums for tensors its files lack: {sorted(unknown)[:3]}"
                    )
            self.sharded_state = ShardedState(
                world_size, layout, tuple(tuple(by_rank[r]) for r in sorted(by_rank)), digests
            )
        except BaseException:
            self.close()
            raise

    @classmethod
    def find_files(cls, model_dir: Path) -> list[Path]:
        with reading(model_dir):
            found = [p for p in model_dir.iterdir() if RANK_FILE.match(p.name) and p.is_file()]
        return sorted(found, key=natural_key)
