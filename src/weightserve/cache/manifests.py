"""Manifests: one rank's plan of one model revision, kept per cache entry.

A manifest is computed once per manifest id and shared by every stream of that rank;
the whole-tensor digests a stream computes are remembered beside it, so a later
GetManifest reports them and a resumed or repeated stream is checked against them.

Manifests are bounded per entry (least recently used first out) and their estimated
size counts in the cache's memory budget: every expert-mapping version and every
(rank, world_size) asked for makes a new one, so without a bound a long-running server
with an EPLB controller would grow without limit.
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from weightserve.sharding.experts import ExpertSlots
from weightserve.sharding.tensor_plan import TensorPlan

MAX_MANIFESTS_PER_ENTRY = 64
"""Manifests kept per open model revision: 8 TP ranks x a few layouts and mapping versions."""

_PLAN_OVERHEAD = 200
_PIECE_BYTES = 100


@dataclass(frozen=True)
class Manifest:
    """One rank's plan, as GetManifest reports it.

    `digests` holds the crc32c of each tensor once a stream has computed it (None
    before); it is shared by every holder of this manifest and only ever filled in.
    """

    manifest_id: str
    revision: str
    format: str
    tensors: list[TensorPlan]
    chunk_bytes: int
    experts: ExpertSlots | None = None
    digests: dict[int, int] = field(default_factory=dict)
    version: int = 0
    """The published version of the weights the plan serves (0: the checkpoint)."""
    memo: dict[str, object] = field(default_factory=dict, compare=False, repr=False)
    """What the servicers derive from the plan once and reuse (its encoded tensor list, its
    shared-memory layout), dropped with the manifest."""

    @cached_property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def digest_list(self) -> list[int | None]:
        """Each tensor's digest in manifest order, None where no stream has computed it yet."""
        return [self.digests.get(i) for i in range(len(self.tensors))]

    def estimated_bytes(self) -> int:
        """Rough memory held by the manifest (for the budget; within 2x of the truth)."""
        return sum(
            _PLAN_OVERHEAD + sys.getsizeof(t.name) + _PIECE_BYTES * len(t.pieces) + 8 * len(t.shape)
            for t in self.tensors
        )


class ManifestStore:
    """Least recently used manifests of one entry, with their total estimated size."""

    def __init__(self, limit: int = MAX_MANIFESTS_PER_ENTRY) -> None:
        self.limit = limit
        self._items: collections.OrderedDict[str, tuple[Manifest, int]] = collections.OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, manifest_id: str) -> Manifest | None:
        """The manifest with this id, if it is kept."""
        found = self._items.get(manifest_id)
        if found is None:
            return None
        self._items.move_to_end(manifest_id)
        return found[0]

    def get_or_build(self, manifest_id: str, build: Callable[[], Manifest]) -> Manifest:
        """The manifest with this id, built (and kept) on first use."""
        found = self._items.get(manifest_id)
        if found is not None:
            self._items.move_to_end(manifest_id)
            return found[0]
        manifest = build()
        size = manifest.estimated_bytes()
        self._items[manifest_id] = (manifest, size)
        self.nbytes += size
        while len(self._items) > self.limit:
            _, (_, dropped) = self._items.popitem(last=False)
            self.nbytes -= dropped
        return manifest

    def clear(self) -> int:
        """Drop every manifest; return the estimated bytes freed."""
        freed = self.nbytes
        self._items.clear()
        self.nbytes = 0
        return freed
