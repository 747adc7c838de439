"""Expert-mapping versions: a version number names one placement forever.

Version 0 is not stored: it is the placement an engine starts with, a pure function of
the model's MoE layout, `ep_size` and `num_redundant_experts` (`start_placement`), so
every server and every restart agree on it. Every published placement gets a new
number, `max(last + 1, Unix time in ms)`: numbers only grow, so a watcher's
`after_version` keeps its meaning, and a restarted server (which forgot its history)
never hands out a number a worker may still hold for another placement. A version the
server no longer knows is refused, never guessed.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable

from weightserve.eplb import ExpertMapping, Topology
from weightserve.errors import InvalidRequestError
from weightserve.sharding.experts import MoeLayout

MAX_VERSIONS = 64
"""Published versions kept per model; a delta since an older one is refused (FAILED_PRECONDITION)."""

MAX_REPLICAS_PER_EXPERT = 4
"""Physical slots per layer are at most this many times the experts (DeepSeek-V3 uses 288 for 256)."""
MAX_EP_RANKS = 4096


def check_placement_size(num_logical: int, num_physical: int, num_gpus: int) -> None:
    """Refuse a placement larger than any model needs, before anything is allocated for it.

    Raises:
        InvalidRequestError: names the numbers and the limit they break.
    """
    if not 1 <= num_gpus <= MAX_EP_RANKS:
        raise InvalidRequestError(f"{num_gpus} expert-parallel ranks; the limit is {MAX_EP_RANKS}")
    limit = min(MAX_REPLICAS_PER_EXPERT * num_logical, num_logical * num_gpus)
    if num_physical > limit:
        raise InvalidRequestError(
            f"{num_physical} expert slots per layer for {num_logical} experts on {num_gpus} ranks; the limit is "
            f"{limit} (at most {MAX_REPLICAS_PER_EXPERT} replicas of an expert, one per rank)"
        )
    if num_physical < num_gpus:
        raise InvalidRequestError(f"{num_physical} expert slots per layer cannot give each of {num_gpus} ranks one")


def next_version(last: int, now_ms: int) -> int:
    """The number of the next published version: larger than every earlier one, and than a
    restarted server's numbers as long as the clock does not run backwards by more than
    the time between two publishes."""
    return max(last + 1, now_ms)


def start_placement(layout: MoeLayout, ep_size: int, num_redundant: int) -> ExpertMapping:
    """Version 0: contiguous blocks of slots, redundant slot p >= E holding expert (p - E) % E.

    Raises:
        InvalidRequestError: too many slots or ranks, or slots that do not divide over them.
    """
    check_placement_size(layout.num_experts, layout.num_experts + num_redundant, ep_size)
    topology = Topology(num_nodes=1, gpus_per_node=ep_size)
    return ExpertMapping.initial(len(layout.layers), layout.num_experts, layout.num_experts + num_redundant, topology)


class MappingHistory:
    """The published mapping versions of one model, newest last, at most `limit` of them."""

    def __init__(self, limit: int = MAX_VERSIONS, clock: Callable[[], float] = time.time) -> None:
        self.limit = limit
        self._clock = clock
        self._versions: collections.OrderedDict[int, ExpertMapping] = collections.OrderedDict()
        self._last = 0

    def latest(self) -> ExpertMapping | None:
        """The mapping in force, or None when nothing was published (version 0 applies)."""
        return next(reversed(self._versions.values()), None)

    def get(self, version: int) -> ExpertMapping | None:
        """The published mapping with this number, if it is still kept."""
        return self._versions.get(version)

    def publish(self, mapping: ExpertMapping) -> ExpertMapping:
        """Keep `mapping` under a new version number and return it so numbered."""
        version = next_version(self._last, int(self._clock() * 1000))
        numbered = dataclasses.replace(mapping, version=version)
        self._versions[version] = numbered
        self._last = version
        while len(self._versions) > self.limit:
            self._versions.popitem(last=False)
        return numbered

    def restore(self, mappings: list[ExpertMapping]) -> None:
        """Keep mappings read back from the state dir (oldest first) under their own numbers."""
        for mapping in mappings[-self.limit :]:
            self._versions[mapping.version] = mapping
            self._last = max(self._last, mapping.version)

    def newer_than(self, version: int) -> list[ExpertMapping]:
        """Kept versions newer than `version`, oldest first."""
        return [m for v, m in self._versions.items() if v > version]

    def known(self) -> list[int]:
        """The kept version numbers, oldest first."""
        return list(self._versions)
