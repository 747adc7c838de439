"""One validated rebalance request: the load table, the slot budget and the topology.

Every check happens here, once, with the numbers in the message; policies receive a
Problem and may assume it is consistent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weightserve.eplb.mapping import ExpertMapping, Topology
from weightserve.errors import InvalidRequestError


@dataclass(frozen=True, eq=False)
class Problem:
    """What a policy places.

    Attributes:
        weight: [layers, num_logical] float64 token counts (finite, >= 0), on the CPU.
        num_physical: physical slots per layer over all GPUs.
        topology: nodes, GPUs per node and expert groups.
        locality: "group" keeps each expert group, with its replicas, on one node
            where groups divide over nodes; "relaxed" lets replicas cross nodes.
    """

    weight: torch.Tensor
    num_physical: int
    topology: Topology
    locality: str = "group"

    @property
    def num_layers(self) -> int:
        """MoE layers."""
        return int(self.weight.shape[0])

    @property
    def num_logical(self) -> int:
        """Logical experts per layer."""
        return int(self.weight.shape[1])

    @property
    def num_gpus(self) -> int:
        """Expert-parallel ranks."""
        return self.topology.num_gpus

    @property
    def slots_per_gpu(self) -> int:
        """Physical slots each GPU holds."""
        return self.num_physical // self.topology.num_gpus

    @property
    def group_size(self) -> int:
        """Logical experts per expert group."""
        return self.num_logical // self.topology.num_groups

    @property
    def hierarchical(self) -> bool:
        """Whether groups divide over nodes, so the node-first scheme applies."""
        return self.topology.num_groups % self.topology.num_nodes == 0

    @property
    def keeps_groups(self) -> bool:
        """Whether placements must keep every group on one node (locality "group", groups divide nodes).

        On one node every placement does; when groups do not divide over nodes (a model
        without group-limited routing has one group) DeepSeek's scheme falls back to
        global balancing, and so do the policies.
        """
        return self.locality == "group" and self.hierarchical and self.topology.num_nodes > 1


LOCALITIES = ("group", "relaxed")
"""Placement constraints a request may ask for; the first is the default."""


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequestError(f"{name} must be a positive integer, got {value!r}")
    return value


def _weight_table(weight: object) -> torch.Tensor:
    try:
        table = torch.as_tensor(weight)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InvalidRequestError(f"weight must be a [layers, experts] table of token counts: {e}") from None
    if table.dim() != 2 or 0 in table.shape:
        raise InvalidRequestError(
            f"weight must be [layers, experts] with layers >= 1 and experts >= 1, got {list(table.shape)}"
        )
    if table.is_complex() or table.dtype == torch.bool:
        raise InvalidRequestError(f"weight must hold real token counts, got dtype {table.dtype}")
    table = table.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(table).all()):
        raise InvalidRequestError("weight holds NaN or infinite token counts")
    if table.numel() and float(table.min()) < 0:
        layer, expert = (int(i) for i in (table < 0).nonzero()[0])
        raise InvalidRequestError(
            f"weight must be non-negative; layer {layer} expert {expert} has {float(table[layer, expert])}"
        )
    return table


def make_problem(
    weight: object, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, locality: str = "group"
) -> Problem:
    """Validate a rebalance request and return it as a Problem.

    Raises:
        InvalidRequestError: a count is not a positive integer, slots do not divide
            over GPUs, GPUs do not divide over nodes, there are fewer slots than
            experts, groups do not divide the experts, a token count is negative
            or not finite, or `locality` is not one of LOCALITIES.
    """
    if locality not in LOCALITIES:
        raise InvalidRequestError(f"locality must be one of {list(LOCALITIES)}, got {locality!r}")
    for name, value in (
        ("num_replicas", num_replicas),
        ("num_groups", num_groups),
        ("num_nodes", num_nodes),
        ("num_gpus", num_gpus),
    ):
        _positive(name, value)
    table = _weight_table(weight)
    num_logical = int(table.shape[1])
    if num_replicas % num_gpus:
        raise InvalidRequestError(f"num_replicas {num_replicas} is not a multiple of num_gpus {num_gpus}")
    if num_gpus % num_nodes:
        raise InvalidRequestError(f"num_gpus {num_gpus} is not a multiple of num_nodes {num_nodes}")
    if num_replicas < num_logical:
        raise InvalidRequestError(
            f"num_replicas {num_replicas} < {num_logical} logical experts; every expert needs a slot"
        )
    if num_logical % num_groups:
        raise InvalidRequestError(f"{num_logical} logical experts do not split into {num_groups} groups")
    topology = Topology(num_nodes=num_nodes, gpus_per_node=num_gpus // num_nodes, num_groups=num_groups)
    return Problem(weight=table, num_physical=num_replicas, topology=topology, locality=locality)


def check_previous(problem: Problem, previous: ExpertMapping | None) -> None:
    """Raise InvalidRequestError when `previous` was made for a different shape of problem."""
    if previous is None:
        return
    want = (problem.num_layers, problem.num_logical, problem.num_physical, problem.num_gpus)
    have = (previous.num_layers, previous.num_logical, previous.num_physical, previous.topology.num_gpus)
    if want != have:
        raise InvalidRequestError(
            "previous mapping does not match the request in (layers, logical, physical, gpus): "
            f"previous {have}, request {want}"
        )
