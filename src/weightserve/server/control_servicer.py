"""ControlService servicer: proto -> domain, call the control plane, domain -> proto."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from weightserve.eplb import ExpertMapping, Topology
from weightserve.errors import JobNotFoundError
from weightserve.server.auth import current_caller
from weightserve.server.call_context import current_call
from weightserve.server.control_plane import ControlPlane, RebalanceJob
from weightserve.server.proto_convert import model_name
from weightserve.server.request_limits import MAX_JOB_ID_BYTES, MAX_POLICY_BYTES, check_text
from weightserve.server.status_codes import call_errors, stream_errors
from weightserve.v1 import weightserve_pb2 as pb

_JOB_STATES = {
    "running": pb.JOB_STATE_RUNNING,
    "succeeded": pb.JOB_STATE_SUCCEEDED,
    "failed": pb.JOB_STATE_FAILED,
}


def topology_from(message: pb.ExpertTopology) -> Topology:
    return Topology(message.num_nodes, message.gpus_per_node, message.num_groups or 1)


def mapping_to(mapping: ExpertMapping, balancedness: float = 0.0) -> pb.ExpertMapping:
    top = mapping.topology
    return pb.ExpertMapping(
        version=mapping.version,
        topology=pb.ExpertTopology(num_nodes=top.num_nodes, gpus_per_node=top.gpus_per_node, num_groups=top.num_groups),
        num_layers=mapping.num_layers,
        num_logical=mapping.num_logical,
        num_physical=mapping.num_physical,
        phy2log=mapping.phy2log.flatten().tolist(),
        balancedness=balancedness,
    )


def job_to(job: RebalanceJob) -> pb.GetRebalanceResponse:
    return pb.GetRebalanceResponse(
        job_id=job.job_id,
        model=job.model,
        state=_JOB_STATES[job.state],
        error=job.error,
        mapping=mapping_to(job.mapping, job.after) if job.mapping is not None else None,
        balancedness_before=job.before,
        balancedness_after=job.after,
        deltas=[pb.RankDelta(ep_rank=r, experts=n, bytes=b) for r, n, b in job.deltas],
        seconds=job.seconds,
        group_locality_before=job.locality_before,
        group_locality_after=job.locality_after,
        dispatch_nodes_before=job.dispatch_before,
        dispatch_nodes_after=job.dispatch_after,
        locality_bound=job.bound,
    )


class ControlServicer:
    """Implements weightserve.v1.ControlService over a ControlPlane."""

    def __init__(self, control: ControlPlane) -> None:
        self.control = control

    @call_errors
    async def ReportExpertLoad(
        self, request: pb.ReportExpertLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportExpertLoadResponse:
        load = request.load
        ep_rank = request.ep_rank if request.HasField("ep_rank") else None
        sequence = request.sequence if request.HasField("sequence") else None
        model = model_name(request.model)
        count, duplicate = await self.control.report(
            model, list(load.counts), load.moe_layers, load.experts, ep_rank, sequence
        )
        return pb.ReportExpertLoadResponse(reports_in_window=count, duplicate=duplicate)

    @call_errors
    async def Rebalance(self, request: pb.RebalanceRequest, context: grpc.aio.ServicerContext) -> pb.RebalanceResponse:
        topology = topology_from(request.topology) if request.HasField("topology") else None
        job_id, running = await self.control.rebalance(
            model_name(request.model),
            check_text("policy", request.policy, MAX_POLICY_BYTES),
            request.num_replicas,
            topology,
            check_text("locality", request.locality, MAX_POLICY_BYTES),
            request.topology.topk_group if request.HasField("topology") else 0,
            groups_from_config=request.HasField("topology") and not request.topology.num_groups,
        )
        return pb.RebalanceResponse(job_id=job_id, already_running=running)

    @call_errors
    async def GetRebalance(
        self, request: pb.GetRebalanceRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRebalanceResponse:
        job_id = check_text("job id", request.job_id, MAX_JOB_ID_BYTES)
        model = self.control.job(job_id).model
        if not current_caller().may_read(model):
            raise JobNotFoundError(f"no rebalance job {job_id[:64]!r} of a model your token covers")
        current_call().note_model(model)  # the audit line names the job's model
        return job_to(await self.control.wait_job(job_id, request.wait_seconds))

    @stream_errors
    async def WatchExpertMapping(
        self, request: pb.WatchExpertMappingRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchExpertMappingResponse]:
        async for mapping in self.control.watch(model_name(request.model), request.after_version):
            yield pb.WatchExpertMappingResponse(mapping=mapping_to(mapping))
