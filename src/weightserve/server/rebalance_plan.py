"""A Rebalance request checked in full before its job starts.

Everything a job would refuse because of the request (slots or GPUs that do not divide,
groups that do not split the experts, a topk_group outside the groups, fewer slots than
experts) is refused here, at the call, as INVALID_ARGUMENT. A job that fails counts in
`weightserve_eplb_rebalances_total{outcome="failed"}` and pages an operator
(WeightserveRebalanceFailed): a caller's mistake must cost the caller, not the on-call.
The checks are the job's own (`eplb.make_problem`, `check_previous`), run on the same
numbers, so what is accepted here is what the job accepts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from weightserve.eplb import DEFAULT_POLICY, LOCALITIES, ExpertMapping, Topology, policy_for
from weightserve.eplb.problem import check_previous, make_problem
from weightserve.errors import InvalidRequestError
from weightserve.sharding.experts import MoeLayout
from weightserve.state.mappings import check_placement_size


@dataclass(frozen=True)
class ModelExperts:
    """A model's MoE structure and the bytes of one expert's weights in one layer."""

    layout: MoeLayout
    bytes_per_expert: int
    n_group: int = 0
    topk_group: int = 0
    """The model config's expert groups and groups per token (0: it names none)."""

    def config_topk_group(self, num_groups: int) -> int:
        """The config's topk_group if it describes `num_groups` groups, else 0.

        It applies when the config names no n_group or the same number of groups as the
        topology, and is at most `num_groups`.
        """
        if self.n_group not in (0, num_groups) or self.topk_group > num_groups:
            return 0
        return self.topk_group


@dataclass(frozen=True)
class RebalancePlan:
    """What one job computes, every field already checked."""

    policy: str
    weight: torch.Tensor
    """The load window's sum when the job was planned (a copy: later reports do not change it)."""
    replicas: int
    topology: Topology
    previous: ExpertMapping
    """The placement the job moves from: the one in force, or version 0 of the new shape."""
    locality: str
    topk_group: int


def check_names(policy: str, locality: str) -> tuple[str, str]:
    """The policy and locality a request names, defaults filled in.

    Raises:
        UnknownNameError: no policy is registered under that name.
        InvalidRequestError: an unknown locality.
    """
    policy = policy or DEFAULT_POLICY
    policy_for(policy)
    locality = locality or LOCALITIES[0]
    if locality not in LOCALITIES:
        raise InvalidRequestError(f"locality must be one of {list(LOCALITIES)}, got {locality[:64]!r}")
    return policy, locality


def plan_rebalance(
    model: str,
    info: ModelExperts,
    load: torch.Tensor,
    in_force: ExpertMapping | None,
    policy: str,
    replicas: int,
    topology: Topology | None,
    locality: str = "",
    topk_group: int = 0,
    *,
    groups_from_config: bool = False,
) -> RebalancePlan:
    """Check a request against the model and the mapping in force; the job it asks for.

    Args:
        load: the model's summed load window, [MoE layers, experts].
        in_force: the latest published mapping (None: version 0 applies).
        replicas: slots per layer; 0 keeps the mapping in force's (or one per expert).
        topology: None keeps the mapping in force's.
        groups_from_config: the request named no num_groups: take the model config's
            n_group when it divides the experts, else 1.
        topk_group: groups per token for the dispatch estimate; 0 takes the config's
            (when its n_group, if any, is the topology's num_groups), else half the groups.

    Raises:
        InvalidRequestError: a request no job could run; the message names the number at fault.
    """
    policy, locality = check_names(policy, locality)
    experts = info.layout.num_experts
    topology = topology or (in_force.topology if in_force else None)
    if topology is None:
        raise InvalidRequestError(f"model {model!r} has no mapping yet: give the topology")
    if groups_from_config and info.n_group > 1 and experts % info.n_group == 0:
        topology = dataclasses.replace(topology, num_groups=info.n_group)
    replicas = replicas or (in_force.num_physical if in_force else experts)
    check_placement_size(experts, replicas, topology.num_gpus)
    if experts % topology.num_groups:
        raise InvalidRequestError(
            f"{topology.num_groups} expert groups for {experts} experts: the groups must divide the experts"
        )
    if not 0 <= topk_group <= topology.num_groups:
        raise InvalidRequestError(f"topk_group must be in [0, {topology.num_groups}] (num_groups), got {topk_group}")
    topk_group = topk_group or info.config_topk_group(topology.num_groups) or max(1, topology.num_groups // 2)
    previous = in_force
    if previous is None or previous.topology.num_gpus != topology.num_gpus or previous.num_physical != replicas:
        # another shape: start from that shape's version 0 (computed, never re-published)
        previous = ExpertMapping.initial(len(info.layout.layers), experts, replicas, Topology(1, topology.num_gpus))
    problem = make_problem(load, replicas, topology.num_groups, topology.num_nodes, topology.num_gpus, locality)
    check_previous(problem, previous)
    return RebalancePlan(policy, load.clone(), replicas, topology, previous, locality, topk_group)
