"""Requests of the ControlService calls, built once for the sync and asyncio clients.

Both clients send the same messages and differ only in how they wait, so everything
that checks a caller's arguments or packs them into protobufs lives here. A bad load
table is refused before it is sent, with a message that names its shape or dtype,
rather than coming back as a server error about a flat list of counts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
import torch

from weightserve.errors import InvalidRequestError
from weightserve.v1 import weightserve_pb2 as pb

logger = logging.getLogger(__name__)

ExpertLoad: TypeAlias = torch.Tensor | np.ndarray | Sequence[Sequence[int]]
"""A [moe_layers, experts] table of integer token counts."""


def expert_counts(counts: ExpertLoad) -> pb.ExpertCounts:
    """Pack a [moe_layers, experts] table of token counts.

    Args:
        counts: an integer torch tensor, numpy array, or list of equally long lists of
            ints; row i is MoE layer i (in model order), column j logical expert j.

    Raises:
        InvalidRequestError: (a ValueError) the table is not 2-D or not integers.
    """
    try:
        table = torch.as_tensor(counts)
    except (TypeError, ValueError, RuntimeError) as e:  # ragged lists, strings, objects
        raise InvalidRequestError(f"expert load must be a [moe_layers, experts] table of integers: {e}") from None
    if table.dim() != 2:
        raise InvalidRequestError(
            f"expert load must be 2-D [moe_layers, experts]; got shape {list(table.shape)}"
            " (sum a batch's counts per layer before reporting)"
        )
    if table.dtype.is_floating_point or table.dtype.is_complex or table.dtype == torch.bool:
        raise InvalidRequestError(f"expert load must hold integer token counts; got dtype {table.dtype}")
    layers, experts = table.shape
    flat = table.to(torch.int64).reshape(-1).tolist()
    return pb.ExpertCounts(moe_layers=layers, experts=experts, counts=flat)


def report_request(
    model: str, counts: ExpertLoad, ep_rank: int | None = None, sequence: int | None = None
) -> pb.ReportExpertLoadRequest:
    """A ReportExpertLoad request; see expert_counts for what `counts` may be.

    With `ep_rank` and `sequence` (a number that grows with each report of that rank,
    such as the step), a report the server already counted is not counted again, so a
    worker may resend a report whose answer it lost.
    """
    return pb.ReportExpertLoadRequest(model=model, load=expert_counts(counts), ep_rank=ep_rank, sequence=sequence)


def rebalance_request(
    model: str,
    *,
    policy: str | None = None,
    num_replicas: int | None = None,
    num_nodes: int | None = None,
    gpus_per_node: int | None = None,
    num_groups: int | None = None,
    locality: str | None = None,
    topk_group: int | None = None,
) -> pb.RebalanceRequest:
    """A Rebalance request; unset fields keep what the model's current mapping has.

    The topology travels as one message, so it is sent only when `num_nodes` or
    `gpus_per_node` is given (the other defaults to 1; `num_groups` and `topk_group` to the
    model config's `n_group` and `topk_group` on the server, else 1 group and half the
    groups); without either the server keeps the current mapping's topology. `locality`
    is "group" (the server's default: every expert group on one node) or "relaxed"
    (replicas may cross nodes).

    Raises:
        InvalidRequestError: `num_groups` or `topk_group` without a topology, which the
            server would otherwise ignore.
    """
    request = pb.RebalanceRequest(
        model=model, policy=policy or "", num_replicas=num_replicas or 0, locality=locality or ""
    )
    if num_nodes or gpus_per_node:
        request.topology.CopyFrom(
            pb.ExpertTopology(
                num_nodes=num_nodes or 1,
                gpus_per_node=gpus_per_node or 1,
                num_groups=num_groups or 0,
                topk_group=topk_group or 0,
            )
        )
    elif num_groups or topk_group:
        given = f"num_groups={num_groups}" if num_groups else f"topk_group={topk_group}"
        raise InvalidRequestError(f"{given} needs num_nodes or gpus_per_node: the topology is sent whole or not at all")
    return request


def job_request(job_id: str, wait: float = 0.0) -> pb.GetRebalanceRequest:
    return pb.GetRebalanceRequest(job_id=job_id, wait_seconds=wait)


def watch_request(model: str, after_version: int) -> pb.WatchExpertMappingRequest:
    return pb.WatchExpertMappingRequest(model=model, after_version=after_version)


def started_job(model: str, response: pb.RebalanceResponse) -> str:
    """The job id of a Rebalance answer, warning when it joined a job already running.

    A joined job keeps the arguments it was started with, so this call's policy and
    topology were not used; the caller only gets the id, hence the warning.
    """
    if response.already_running:
        logger.warning(
            "a rebalance of %r was already running; returning its job %s, which keeps the policy "
            "and topology it was started with",
            model,
            response.job_id,
        )
    return str(response.job_id)
