"""`weightserve report-load` and `weightserve rebalance`: drive MoE expert placement from a shell."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import pickle
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weightserve.cli.remote import add_server_args, client_options, connect, positive_int, reach, security_of

if TYPE_CHECKING:
    from weightserve.client import AsyncWeightClient
    from weightserve.v1 import weightserve_pb2 as pb

POLICIES = ("hierarchical", "locality-aware", "greedy")
"""The built-in EPLB policies, the server's default first. Named here so that --help
imports no torch; a test keeps it equal to weightserve.eplb.available_policies()."""

LONGEST_WAIT_SECONDS = 300.0
"""The longest one GetRebalance(wait_seconds) call is asked to hold (the server's own cap)."""


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    report = sub.add_parser("report-load", help="report a MoE model's expert token counts (one worker's load)")
    report.add_argument("model")
    add_server_args(report)
    report.add_argument(
        "--counts", required=True, metavar="FILE",
        help="[moe_layers, experts] integer table: .json (a list of lists), .npy or .pt; '-' reads JSON from stdin",
    )  # fmt: skip
    report.set_defaults(run=run_report)

    rebalance = sub.add_parser("rebalance", help="rebalance a MoE model's experts from the reported load")
    rebalance.add_argument("model")
    add_server_args(rebalance, timeout=600.0, timeout_help="seconds to wait for the server and the job (default 600)")
    rebalance.add_argument(
        "--policy", help=f"{POLICIES[0]} (the default), {', '.join(POLICIES[1:])}, or one registered on the server"
    )
    rebalance.add_argument(
        "--num-replicas", type=positive_int,
        help="expert slots per layer, a multiple of the GPUs (default: the current mapping's, or one per expert)",
    )  # fmt: skip
    rebalance.add_argument(
        "--nodes", type=positive_int, help="server nodes (with --gpus-per-node; needed the first time)"
    )
    rebalance.add_argument("--gpus-per-node", type=positive_int, help="EP ranks per node")
    rebalance.add_argument(
        "--groups", type=positive_int, help="expert groups (default the config's n_group, else 1; with the topology)"
    )
    rebalance.add_argument(
        "--topk-group", type=positive_int,
        help="groups each token is routed to, for the dispatch estimate "
        "(default the model config's topk_group, else half the groups; with the topology)",
    )  # fmt: skip
    rebalance.add_argument(
        "--locality", choices=("group", "relaxed"),
        help="group (the default): every expert group on one node, as node-limited routing needs; "
        "relaxed: replicas may cross nodes, more balance for more inter-node traffic",
    )  # fmt: skip
    rebalance.set_defaults(run=run_rebalance)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _read_npy(path: Path) -> Any:
    import numpy as np

    return np.load(path, allow_pickle=False)


def _read_pt(path: Path) -> Any:
    import torch

    return torch.load(path, weights_only=True)  # a counts file is untrusted input: tensors only


READERS: dict[str, Callable[[Path], Any]] = {".json": _read_json, ".npy": _read_npy, ".pt": _read_pt}
"""Counts readers by file suffix; any other suffix is read as JSON."""


def read_counts(source: str) -> Any:
    """The load table in `source`: a file read by its suffix, or JSON from stdin for '-'."""
    if source == "-":
        return json.load(sys.stdin)
    path = Path(source)
    return READERS.get(path.suffix.lower(), _read_json)(path)


def run_report(args: argparse.Namespace) -> int:
    try:
        counts = read_counts(args.counts)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
        sys.stderr.write(f"weightserve report-load: cannot read counts from {args.counts}: {e}\n")
        return 2
    with connect(args) as client:
        reports = client.report_expert_load(args.model, counts)
    sys.stdout.write(f"{args.model}: {reports} report(s) in the load window\n")
    return 0


def run_rebalance(args: argparse.Namespace) -> int:
    reach(args.server, args.timeout, security_of(args))
    job = asyncio.run(_rebalance(args))
    return print_job(args.model, job)


async def _rebalance(args: argparse.Namespace) -> pb.GetRebalanceResponse:
    from weightserve.client import AsyncWeightClient

    async with AsyncWeightClient(args.server, timeout=args.timeout, **client_options(security_of(args))) as client:
        job_id = await client.rebalance(
            args.model,
            policy=args.policy,
            num_replicas=args.num_replicas,
            num_nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            num_groups=args.groups,
            locality=args.locality,
            topk_group=args.topk_group,
        )
        return await finished_job(client, args.model, job_id, args.timeout)


async def finished_job(client: AsyncWeightClient, model: str, job_id: str, timeout: float) -> pb.GetRebalanceResponse:
    """The job once it stops running, or as it stands when `timeout` seconds have passed.

    Nothing polls. Two calls wait on the server at once, and the first to answer ends the
    wait: the WatchExpertMapping stream, which wakes as soon as the job publishes its
    mapping, and GetRebalance(wait_seconds), which answers when the job ends, so a job
    that fails (and publishes nothing) ends the wait with its error at once.
    """
    from weightserve.v1 import weightserve_pb2 as pb

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    job = await client.get_rebalance(job_id)
    if job.state != pb.JOB_STATE_RUNNING:
        return job
    async with contextlib.aclosing(client.watch_mapping(model)) as mappings:
        published: asyncio.Future[Any] = asyncio.ensure_future(anext(mappings, None))
        try:
            while job.state == pb.JOB_STATE_RUNNING and (left := deadline - loop.time()) > 0:
                ended = asyncio.ensure_future(client.get_rebalance(job_id, wait=min(left, LONGEST_WAIT_SECONDS)))
                await asyncio.wait({ended, published}, return_when=asyncio.FIRST_COMPLETED)
                if ended.done():
                    job = ended.result()
                    continue
                await _discard(ended)  # a mapping was published: look at the job now
                job = await client.get_rebalance(job_id)
                more = published.exception() is None and published.result() is not None
                # a stream that ended or failed wakes nothing more: the GetRebalance wait remains
                published = asyncio.ensure_future(anext(mappings, None)) if more else loop.create_future()
        finally:
            await _discard(published)
    return job


async def _discard(future: asyncio.Future[Any]) -> None:
    """Cancel a pending call and let it unwind (a finished one keeps its result)."""
    future.cancel()
    await asyncio.wait({future})
    if not future.cancelled():
        future.exception()  # it finished first; whatever it raised was reported or no longer matters


def print_job(model: str, job: pb.GetRebalanceResponse) -> int:
    """Print a finished job's balancedness and per-rank bytes; 1 unless it succeeded."""
    from weightserve.v1 import weightserve_pb2 as pb

    out = sys.stdout
    if job.state != pb.JOB_STATE_SUCCEEDED:
        state = pb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
        out.write(f"rebalance {job.job_id} of {model}: {' '.join(filter(None, (state, job.error)))}\n")
        return 1
    out.write(
        f"rebalanced {model} to mapping v{job.mapping.version} in {job.seconds:.2f}s; "
        f"group locality {job.group_locality_before:.3f} -> {job.group_locality_after:.3f}, "
        f"dispatch nodes per token {job.dispatch_nodes_before:.2f} -> {job.dispatch_nodes_after:.2f}, "
        f"best balancedness with every group on one node {job.locality_bound:.3f}\n"
        f"balancedness {job.balancedness_before:.3f} -> {job.balancedness_after:.3f}\n"
        f"{'EP RANK':>7}  {'EXPERTS':>7}  BYTES TO FETCH\n"
    )
    for delta in job.deltas:
        out.write(f"{delta.ep_rank:>7}  {delta.experts:>7}  {delta.bytes:,}\n")
    return 0
