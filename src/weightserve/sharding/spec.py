"""ShardSpec: the parameters of one rank's plan, validated."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from weightserve.errors import InvalidRequestError

LAYOUTS = ("checkpoint", "vllm")

MAX_PARALLEL = 1 << 16
"""Largest world_size, pp_size or ep_size a request may name; the model's own dimensions
(heads, layers, experts) bound them further where each is used."""


@dataclass(frozen=True)
class ShardSpec:
    """One rank's share of one model. Zero sizes mean "not split" (1, or no EP)."""

    model: str
    revision: str = ""
    format: str = ""
    rank: int = 0
    world_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 0
    layout: str = "checkpoint"
    num_redundant_experts: int = 0
    since_mapping: int | None = None
    version: int | None = None
    """A published version of the weights (0: the checkpoint); None: the latest."""
    since_version: int | None = None
    """Only the tensors whose served bytes differ from this version's."""

    def __post_init__(self) -> None:
        if not self.model:
            raise InvalidRequestError("model name is empty")
        _check_rank("rank", self.rank, "world_size", self.world_size)
        _check_rank("pp_rank", self.pp_rank, "pp_size", self.pp_size)
        if self.ep_size or self.ep_rank:
            _check_rank("ep_rank", self.ep_rank, "ep_size", self.ep_size)
        if self.num_redundant_experts < 0:
            raise InvalidRequestError(f"num_redundant_experts {self.num_redundant_experts} must be >= 0")
        if self.since_mapping is not None and not self.ep_size:
            raise InvalidRequestError("since_mapping needs ep_rank/ep_size")
        for name in ("version", "since_version"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1 << 62:
                raise InvalidRequestError(f"{name} {value} is out of range")
        if self.layout not in LAYOUTS:
            raise InvalidRequestError(f"layout {self.layout!r} is not one of {LAYOUTS}")

    def plan_params(self) -> dict[str, Any]:
        """What the plan depends on, besides the revision (the manifest id's input)."""
        params = asdict(self)
        del params["revision"]
        return params


def _check_rank(rank_name: str, rank: int, size_name: str, size: int) -> None:
    if not 1 <= size <= MAX_PARALLEL:
        raise InvalidRequestError(f"{size_name} {size} must be within [1, {MAX_PARALLEL}]")
    if not 0 <= rank < size:
        raise InvalidRequestError(f"{rank_name} {rank} must satisfy 0 <= {rank_name} < {size_name} {size}")
