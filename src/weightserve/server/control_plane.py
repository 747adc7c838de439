"""The control plane: expert load windows, background rebalances, versioned mappings.

Transport-free like the data plane. Mappings are per model name and live in memory:
version 0 is the placement an engine starts with, each finished rebalance publishes
the next version, and watchers are woken for every new one. Rebalances run on the
thread pool, never on the event loop, so streams are not slowed by them.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch

from weightserve.cache.model_cache import ModelCache
from weightserve.eplb import ExpertMapping, Topology, balancedness, rebalance_experts
from weightserve.errors import InvalidRequestError, JobNotFoundError, PreconditionError
from weightserve.sharding.experts import ExpertSlots, MoeLayout, is_expert
from weightserve.sharding.spec import ShardSpec

logger = logging.getLogger(__name__)

MAX_FINISHED_JOBS = 256
"""Finished rebalance jobs kept for GetRebalance; the oldest expire first (running ones never)."""


class LoadWindow:
    """The element-wise sum of the last `size` load reports of one model."""

    def __init__(self, size: int) -> None:
        self.reports: collections.deque[torch.Tensor] = collections.deque()
        self.size = size
        self.total: torch.Tensor | None = None

    def add(self, counts: torch.Tensor) -> int:
        if self.total is None or self.total.shape != counts.shape:
            self.reports.clear()
            self.total = torch.zeros_like(counts)
        self.reports.append(counts)
        self.total += counts
        if len(self.reports) > self.size:
            self.total -= self.reports.popleft()
        return len(self.reports)


@dataclass
class RebalanceJob:
    """A rebalance, running or done."""

    job_id: str
    model: str
    state: str = "running"
    error: str = ""
    mapping: ExpertMapping | None = None
    before: float = 0.0
    after: float = 0.0
    deltas: list[tuple[int, int, int]] = field(default_factory=list)  # (ep_rank, experts, bytes)
    seconds: float = 0.0


@dataclass(frozen=True)
class ModelExperts:
    """A model's MoE structure and the bytes of one expert's weights in one layer."""

    layout: MoeLayout
    bytes_per_expert: int


class ControlPlane:
    """What the ControlService RPCs do, and expert placement for FetchShard."""

    def __init__(self, cache: ModelCache, executor: Executor, window: int = 1000) -> None:
        self.cache = cache
        self.executor = executor
        self.window = window
        self.windows: dict[str, LoadWindow] = {}
        self.mappings: dict[str, dict[int, ExpertMapping]] = {}
        self.jobs: collections.OrderedDict[str, RebalanceJob] = collections.OrderedDict()
        self.running: dict[str, str] = {}
        self._published: dict[str, asyncio.Condition] = {}
        self._wakers: set[asyncio.Task[None]] = set()
        self._experts: dict[tuple[str, str], ModelExperts] = {}

    async def experts_of(self, model: str) -> ModelExperts:
        """The model's MoE layout (INVALID_ARGUMENT for a dense model)."""
        async with self.cache.use(model) as entry:
            key = (entry.name, entry.revision)
            known = self._experts.get(key)
            if known is not None:  # reports arrive often; scan the tensor names once per revision
                return known
            layout = entry.moe_layout()
            if layout is None:
                raise InvalidRequestError(f"model {model!r} has no experts")
            expert_bytes = sum(r.nbytes for r in entry.loader.records if is_expert(r.name))
            known = self._experts[key] = ModelExperts(layout, expert_bytes // (len(layout.layers) * layout.num_experts))
            return known

    async def report(self, model: str, counts: list[int], layers: int, experts: int) -> int:
        """Add one report; INVALID_ARGUMENT (changing nothing) if it does not fit the model."""
        info = await self.experts_of(model)
        want = (len(info.layout.layers), info.layout.num_experts)
        if (layers, experts) != want or len(counts) != layers * experts:
            raise InvalidRequestError(
                f"load for {model!r} must be [{want[0]} MoE layers, {want[1]} experts] "
                f"({want[0] * want[1]} counts); got [{layers}, {experts}] with {len(counts)} counts"
            )
        table = torch.tensor(counts, dtype=torch.int64).view(layers, experts)
        if bool((table < 0).any()):
            raise InvalidRequestError("expert load counts must be non-negative")
        return self.windows.setdefault(model, LoadWindow(self.window)).add(table)

    def current(self, model: str) -> ExpertMapping | None:
        versions = self.mappings.get(model)
        return versions[max(versions)] if versions else None

    def mapping(self, model: str, version: int) -> ExpertMapping:
        found = self.mappings.get(model, {}).get(version)
        if found is None:
            have = sorted(self.mappings.get(model, {}))
            raise PreconditionError(f"model {model!r} has no expert mapping version {version} (have {have})")
        return found

    def _publish(self, model: str, mapping: ExpertMapping) -> None:
        self.mappings.setdefault(model, {})[mapping.version] = mapping
        condition = self._published.setdefault(model, asyncio.Condition())

        async def wake() -> None:
            async with condition:
                condition.notify_all()

        task = asyncio.ensure_future(wake())
        self._wakers.add(task)
        task.add_done_callback(self._wakers.discard)

    def _initial(self, model: str, layout: MoeLayout, physical: int, topology: Topology) -> ExpertMapping:
        mapping = ExpertMapping.initial(len(layout.layers), layout.num_experts, physical, topology)
        self._publish(model, mapping)
        return mapping

    async def rebalance(self, model: str, policy: str, replicas: int, topology: Topology | None) -> tuple[str, bool]:
        """Start a job (or return the running one's id)."""
        if model in self.running:
            return self.running[model], True
        info = await self.experts_of(model)
        window = self.windows.get(model)
        if window is None or window.total is None:
            raise PreconditionError(f"no expert load reported for {model!r}; call ReportExpertLoad first")
        previous = self.current(model)
        topology = topology or (previous.topology if previous else None)
        if topology is None:
            raise InvalidRequestError(f"model {model!r} has no mapping yet: give the topology")
        replicas = replicas or (previous.num_physical if previous else info.layout.num_experts)
        if previous is None or previous.topology.num_gpus != topology.num_gpus or previous.num_physical != replicas:
            previous = self._initial(model, info.layout, replicas, topology)
        job = RebalanceJob(uuid.uuid4().hex[:16], model)
        self.jobs[job.job_id] = job
        self.running[model] = job.job_id
        weight = window.total.clone()
        task = asyncio.ensure_future(self._run(job, weight, policy, replicas, topology, previous, info))
        task.add_done_callback(lambda _: self.running.pop(model, None))
        return job.job_id, False

    async def _run(
        self,
        job: RebalanceJob,
        weight: torch.Tensor,
        policy: str,
        replicas: int,
        topology: Topology,
        previous: ExpertMapping,
        info: ModelExperts,
    ) -> None:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            mapping = await loop.run_in_executor(
                self.executor,
                lambda: rebalance_experts(
                    weight,
                    replicas,
                    topology.num_groups,
                    topology.num_nodes,
                    topology.num_gpus,
                    policy=policy or None,
                    previous=previous,
                ),
            )
            job.before, job.after = balancedness(weight, previous), balancedness(weight, mapping)
            for gpu in range(topology.num_gpus):
                moved = sum(len(slots) for slots in mapping.delta(previous, gpu))
                job.deltas.append((gpu, moved, moved * info.bytes_per_expert))
            job.mapping, job.state = mapping, "succeeded"
            self._publish(job.model, mapping)
            logger.info(
                "rebalanced %s to v%d: balancedness %.3f -> %.3f",
                job.model,
                mapping.version,
                job.before,
                job.after,
            )
        except Exception as e:  # reported through GetRebalance
            job.state, job.error = "failed", str(e)
            logger.warning("rebalance of %s failed: %s", job.model, e)
        job.seconds = time.perf_counter() - started
        self._expire_jobs()

    def _expire_jobs(self) -> None:
        """Forget the oldest finished jobs beyond MAX_FINISHED_JOBS (jobs are kept in start order)."""
        finished = [job_id for job_id, job in self.jobs.items() if job.state != "running"]
        for job_id in finished[: max(0, len(finished) - MAX_FINISHED_JOBS)]:
            del self.jobs[job_id]

    def job(self, job_id: str) -> RebalanceJob:
        """The job with this id.

        Raises:
            JobNotFoundError: no such job (never started here, or finished long ago and expired).
        """
        try:
            return self.jobs[job_id]
        except KeyError:
            raise JobNotFoundError(
                f"no rebalance job {job_id[:64]!r} on this server (finished jobs expire after "
                f"{MAX_FINISHED_JOBS} newer ones finish, and a restart forgets them)"
            ) from None

    async def watch(self, model: str, after_version: int) -> AsyncIterator[ExpertMapping]:
        """Every mapping version of `model` newer than `after_version`, as published."""
        await self.experts_of(model)
        condition = self._published.setdefault(model, asyncio.Condition())
        if after_version:
            sent = after_version
        else:  # start from the current version
            current = self.current(model)
            sent = current.version - 1 if current else -1
        for _ in itertools.count():
            newer = sorted(v for v in self.mappings.get(model, {}) if v > sent)
            for version in newer:
                sent = version
                yield self.mappings[model][version]
            async with condition:
                if not any(v > sent for v in self.mappings.get(model, {})):
                    await condition.wait()

    def slots(self, spec: ShardSpec, layout: MoeLayout) -> ExpertSlots:
        """The slots EP rank `spec.ep_rank` holds now, and the delta since `spec.since_mapping`."""
        current = self.current(spec.model)
        if current is None:
            topology = Topology(num_nodes=1, gpus_per_node=spec.ep_size)
            current = self._initial(spec.model, layout, layout.num_experts + spec.num_redundant_experts, topology)
        if current.topology.num_gpus != spec.ep_size:
            raise InvalidRequestError(
                f"model {spec.model!r} expert mapping v{current.version} is for ep_size "
                f"{current.topology.num_gpus}; asked for ep_size {spec.ep_size}"
            )
        slots = current.gpu_slots(spec.ep_rank)
        physical = tuple(tuple(slots) for _ in layout.layers)
        logical = tuple(tuple(current.experts_on_gpu(layer, spec.ep_rank)) for layer in range(len(layout.layers)))
        if spec.since_mapping is None:
            send = tuple(tuple(range(len(slots))) for _ in layout.layers)
        else:
            old = self.mapping(spec.model, spec.since_mapping)
            fresh = current.delta(old, spec.ep_rank)
            send = tuple(tuple(p - slots.start for p in layer) for layer in fresh)
        return ExpertSlots(current.version, layout.layers, physical, logical, send, spec.since_mapping is not None)
