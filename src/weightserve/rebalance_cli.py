"""`weightserve rebalance MODEL --server ADDR`: start a rebalance, wait, print what moved."""

from __future__ import annotations

import argparse
import sys
import time

import grpc

from weightserve.client.common import channel_options, fetch_error, target
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc

POLL_SECONDS = 0.2


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("rebalance", help="rebalance a MoE model's experts from the reported load")
    parser.add_argument("model")
    parser.add_argument("--server", required=True)
    parser.add_argument("--policy", default="", help="hierarchical (default), locality, greedy")
    parser.add_argument("--num-replicas", type=int, default=0, help="physical expert slots per layer")
    parser.add_argument("--nodes", type=int, help="server nodes (with --gpus-per-node, the first time)")
    parser.add_argument("--gpus-per-node", type=int)
    parser.add_argument("--groups", type=int, default=1, help="expert groups of the model")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the job")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    request = pb.RebalanceRequest(model=args.model, policy=args.policy, num_replicas=args.num_replicas)
    if args.nodes or args.gpus_per_node:
        request.topology.CopyFrom(
            pb.ExpertTopology(num_nodes=args.nodes or 1, gpus_per_node=args.gpus_per_node or 1, num_groups=args.groups)
        )
    with grpc.insecure_channel(target(args.server), options=channel_options()) as channel:
        stub = pb_grpc.ControlServiceStub(channel)
        try:
            started = stub.Rebalance(request)
            deadline = time.monotonic() + args.timeout
            job = stub.GetRebalance(pb.GetRebalanceRequest(job_id=started.job_id))
            while job.state == pb.JOB_STATE_RUNNING and time.monotonic() < deadline:
                time.sleep(POLL_SECONDS)
                job = stub.GetRebalance(pb.GetRebalanceRequest(job_id=started.job_id))
        except grpc.RpcError as e:
            raise fetch_error(e, f"rebalance {args.model}") from None
    out = sys.stdout
    if job.state != pb.JOB_STATE_SUCCEEDED:
        state = pb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
        out.write(f"rebalance {job.job_id} of {args.model}: {state} {job.error}\n")
        return 1
    out.write(
        f"rebalanced {args.model} to mapping v{job.mapping.version} in {job.seconds:.2f}s"
        f"{' (joined a running job)' if started.already_running else ''}\n"
        f"balancedness {job.balancedness_before:.3f} -> {job.balancedness_after:.3f}\n"
        f"{'EP RANK':>7}  {'EXPERTS':>7}  BYTES TO FETCH\n"
    )
    for delta in job.deltas:
        out.write(f"{delta.ep_rank:>7}  {delta.experts:>7}  {delta.bytes:,}\n")
    return 0
