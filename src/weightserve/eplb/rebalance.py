"""The entry point: validate a request, run a policy, return a versioned mapping."""

from __future__ import annotations

import logging

from weightserve.eplb._threads import one_thread
from weightserve.eplb.mapping import ExpertMapping
from weightserve.eplb.policies.base import Policy, resolve_policy
from weightserve.eplb.problem import check_previous, make_problem
from weightserve.errors import InvalidRequestError

logger = logging.getLogger(__name__)


def rebalance_experts(
    weight: object,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    policy: str | Policy | None = None,
    previous: ExpertMapping | None = None,
    locality: str = "group",
) -> ExpertMapping:
    """Place `num_replicas` expert replicas per layer on `num_gpus` GPUs.

    GPU g holds physical slots [g*S, (g+1)*S) with S = num_replicas / num_gpus; GPU g
    is on node g // (num_gpus / num_nodes).

    Args:
        weight: [layers, num_logical_experts] token counts (tensor or nested lists).
        num_replicas: physical slots per layer over all GPUs (>= num_logical_experts).
        num_groups: expert groups of the model (they must divide the experts).
        num_nodes: server nodes.
        num_gpus: GPUs (expert-parallel ranks), a multiple of num_nodes.
        policy: a registered policy name, a Policy, or None for the default
            (`hierarchical`).
        previous: the mapping in force; its version + 1 becomes the new version and
            move-limiting policies start from it.
        locality: "group" (default) keeps every expert group, with all its
            replicas, on one node whenever groups divide over nodes, which is what
            node-limited routing needs; "relaxed" lets replicas cross nodes for
            balance (for engines that do not limit routing by node).

    Returns:
        The new ExpertMapping (version 1 without `previous`).

    Raises:
        InvalidRequestError: inconsistent sizes, negative or non-finite weights, an
            unknown policy or locality, a `previous` for another shape, or a policy that broke an
            invariant.

    Example:
        >>> m = rebalance_experts([[90, 132, 40, 61]], 8, 2, 1, 4)
        >>> m.phy2log.shape, int(m.logcnt.min()) >= 1
        (torch.Size([1, 8]), True)
    """
    problem = make_problem(weight, num_replicas, num_groups, num_nodes, num_gpus, locality)
    check_previous(problem, previous)
    chosen = resolve_policy(policy)
    with one_thread():
        phy2log = chosen.place(problem, previous)
    if tuple(phy2log.shape) != (problem.num_layers, problem.num_physical):
        raise InvalidRequestError(
            f"policy {chosen.name!r} returned phy2log of shape {list(phy2log.shape)}, "
            f"expected {[problem.num_layers, problem.num_physical]}"
        )
    version = 1 if previous is None else previous.version + 1
    mapping = ExpertMapping.from_phy2log(phy2log, problem.num_logical, problem.topology, version)
    logger.debug("policy %s placed %d layers (version %d)", chosen.name, problem.num_layers, version)
    return mapping
