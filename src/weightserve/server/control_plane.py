"""The control plane: expert load windows, background rebalances, versioned mappings.

Transport-free like the data plane. Mappings are per model name: version 0 is the
placement an engine starts with, each finished rebalance publishes the next version,
and watchers are woken for every new one. With a state dir (ControlStore), each
published mapping is written when it is published and the load windows are
snapshotted every SNAPSHOT_SECONDS and at shutdown; both are read back at start.
Without one they live in memory only. Rebalances run on the thread pool, never on the
event loop, so streams are not slowed by them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch

from weightserve.cache.model_cache import ModelCache
from weightserve.eplb import (
    ExpertMapping,
    Topology,
    balancedness,
    dispatch_nodes,
    group_locality,
    locality_bound,
    rebalance_experts,
)
from weightserve.errors import InvalidRequestError, JobNotFoundError, PreconditionError
from weightserve.recording import NULL_RECORDER, Recorder
from weightserve.server.rebalance_plan import ModelExperts, RebalancePlan, check_names, plan_rebalance
from weightserve.sharding.experts import ExpertSlots, MoeLayout, is_expert
from weightserve.sharding.spec import ShardSpec
from weightserve.state.control_store import ControlStore
from weightserve.state.load import LoadWindow, ReportSequences, check_counts
from weightserve.state.mappings import MappingHistory, start_placement

logger = logging.getLogger(__name__)

MAX_JOB_WAIT_SECONDS = 300.0
"""The longest GetRebalance(wait_seconds) holds a call before answering with the job still running."""

SNAPSHOT_SECONDS = 60.0
"""How often load windows that changed are written to the state dir (and once at shutdown)."""

MAX_FINISHED_JOBS = 256
"""Finished rebalance jobs kept for GetRebalance; the oldest expire first (running ones never)."""


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
    locality_before: float = 0.0
    locality_after: float = 0.0
    dispatch_before: float = 0.0
    dispatch_after: float = 0.0
    bound: float = 0.0
    """Group locality, estimated dispatch nodes (before, after) and the locality bound."""
    seconds: float = 0.0
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the job stops running, whether it succeeded or failed."""


class ControlPlane:
    """What the ControlService RPCs do, and expert placement for FetchShard."""

    def __init__(
        self,
        cache: ModelCache,
        executor: Executor,
        window: int = 1000,
        recorder: Recorder = NULL_RECORDER,
        store: ControlStore | None = None,
    ) -> None:
        self.cache = cache
        self.recorder = recorder
        self.last_report_wall: dict[str, float] = {}
        """Unix time of each model's last counted load report (a stalled controller shows as an old one)."""
        self.executor = executor
        self.window = window
        self.windows: dict[str, LoadWindow] = {}
        self.histories: dict[str, MappingHistory] = {}
        self.sequences: dict[str, ReportSequences] = {}
        self.jobs: collections.OrderedDict[str, RebalanceJob] = collections.OrderedDict()
        self.running: dict[str, str] = {}
        self._published: dict[str, asyncio.Condition] = {}
        self._wakers: set[asyncio.Task[None]] = set()
        self._experts: dict[tuple[str, str], ModelExperts] = {}
        self.store = store
        self._changed: set[str] = set()
        """Models whose load window changed since the last snapshot."""
        if store is not None:
            self._restore(store)

    def _restore(self, store: ControlStore) -> None:
        for model, mappings in store.load_mappings().items():
            self.histories.setdefault(model, MappingHistory()).restore(mappings)
        for model, saved in store.load_loads(self.window).items():
            self.windows[model], self.sequences[model] = saved.window, saved.sequences
            self.last_report_wall[model] = saved.last_report_wall
        if self.histories or self.windows:
            restored = (len(self.histories), len(self.windows))
            logger.info("restored expert state: mappings of %d models, load windows of %d", *restored)

    def snapshot(self) -> int:
        """Write the load windows that changed since the last snapshot; the number written."""
        return self._write_snapshots(self._changed_windows())

    async def keep_snapshots(self, every: float = SNAPSHOT_SECONDS) -> None:
        """Snapshot the load windows every `every` seconds until cancelled (then once more).

        The windows are copied here, on the event loop that changes them, and written on a
        thread: a report arriving during the write must not change what is being written.
        """
        try:
            while True:
                await asyncio.sleep(every)
                await asyncio.to_thread(self._write_snapshots, self._changed_windows())
        finally:
            self.snapshot()

    def _changed_windows(self) -> list[tuple[str, list[torch.Tensor], dict[int, int], float]]:
        """(model, reports, sequences, last report time) of each window changed since the last snapshot."""
        if self.store is None:
            return []
        changed, self._changed = self._changed, set()
        copies = []
        for model in changed:
            window = self.windows.get(model)
            if window is not None:
                wall = self.last_report_wall.get(model, 0.0)
                copies.append((model, list(window.reports), dict(self.sequences[model].last), wall))
        return copies

    def _write_snapshots(self, copies: list[tuple[str, list[torch.Tensor], dict[int, int], float]]) -> int:
        if self.store is not None:
            for model, reports, sequences, wall in copies:
                self.store.save_load(model, reports, sequences, wall)
        return len(copies)

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
            config = entry.model_config
            known = self._experts[key] = ModelExperts(
                layout,
                expert_bytes // (len(layout.layers) * layout.num_experts),
                config.n_group,
                config.topk_group,
            )
            return known

    async def report(
        self,
        model: str,
        counts: list[int],
        layers: int,
        experts: int,
        ep_rank: int | None = None,
        sequence: int | None = None,
    ) -> tuple[int, bool]:
        """Add one report; returns (reports in the window, whether it was a retry already counted).

        Raises:
            InvalidRequestError: the report does not fit the model, or a count is out of bounds
                (nothing changes).
        """
        info = await self.experts_of(model)
        want = (len(info.layout.layers), info.layout.num_experts)
        if (layers, experts) != want or len(counts) != layers * experts:
            raise InvalidRequestError(
                f"load for {model!r} must be [{want[0]} MoE layers, {want[1]} experts] "
                f"({want[0] * want[1]} counts); got [{layers}, {experts}] with {len(counts)} counts"
            )
        check_counts(counts)
        window = self.windows.setdefault(model, LoadWindow(self.window))
        if self.sequences.setdefault(model, ReportSequences()).is_retry(ep_rank, sequence):
            return len(window.reports), True
        in_window = window.add(torch.tensor(counts, dtype=torch.int64).view(layers, experts))
        self._changed.add(model)
        self.last_report_wall[model] = time.time()
        self.recorder.load_report(model)
        return in_window, False

    def current(self, model: str) -> ExpertMapping | None:
        """The latest published mapping of `model`; None while version 0 (not stored) applies."""
        history = self.histories.get(model)
        return history.latest() if history else None

    def mapping(self, model: str, version: int, layout: MoeLayout, spec: ShardSpec) -> ExpertMapping:
        """Mapping `version` of `model`: version 0 for the spec's shape, else a kept published one.

        Raises:
            PreconditionError: the server cannot prove it knows that version (a restart
                forgot it, or it is older than the kept history): fetch the full share.
        """
        if version == 0:
            return start_placement(layout, spec.ep_size, spec.num_redundant_experts)
        history = self.histories.get(model)
        found = history.get(version) if history else None
        if found is None:
            known = history.known() if history else []
            raise PreconditionError(
                f"model {model!r} has no expert mapping version {version} on this server (known: "
                f"{known[-5:] or 'none'}; it restarted or the version expired): fetch the rank's full share"
            )
        return found

    def _publish(self, model: str, mapping: ExpertMapping) -> ExpertMapping:
        """Give `mapping` the next version number, keep it and wake the watchers."""
        history = self.histories.setdefault(model, MappingHistory())
        published = history.publish(mapping)
        if self.store is not None:  # before anyone can hear of the version, so a restart knows it too
            self.store.save_mapping(model, published, history.known())
        condition = self._published.setdefault(model, asyncio.Condition())

        async def wake() -> None:
            async with condition:
                condition.notify_all()

        task = asyncio.ensure_future(wake())
        self._wakers.add(task)
        task.add_done_callback(self._wakers.discard)
        return published

    async def rebalance(
        self,
        model: str,
        policy: str,
        replicas: int,
        topology: Topology | None,
        locality: str = "",
        topk_group: int = 0,
        *,
        groups_from_config: bool = False,
    ) -> tuple[str, bool]:
        """Start a job (or return the running one's id); see `plan_rebalance` for the arguments.

        A second call for the model while a job runs, or while another call is starting
        one, gets that job's id: the check of `running` and the job's registration follow
        the last await with none between, so two calls cannot both pass the check.

        Raises:
            UnknownNameError: no policy is registered as `policy`.
            InvalidRequestError: a request no job could run (INVALID_ARGUMENT at once, never
                a job that fails later).
            PreconditionError: no load was reported for the model yet.
        """
        check_names(policy, locality)  # before opening the model
        info = await self.experts_of(model)
        # No await from here on: this is one step of the event loop.
        running = self.running.get(model)
        if running is not None:
            return running, True
        window = self.windows.get(model)
        if window is None or window.total is None:
            raise PreconditionError(f"no expert load reported for {model!r}; call ReportExpertLoad first")
        plan = plan_rebalance(
            model,
            info,
            window.total,
            self.current(model),
            policy,
            replicas,
            topology,
            locality,
            topk_group,
            groups_from_config=groups_from_config,
        )
        job = RebalanceJob(uuid.uuid4().hex[:16], model)
        self.jobs[job.job_id] = job
        self.running[model] = job.job_id
        self.recorder.rebalance_started(model, plan.policy)
        task = asyncio.ensure_future(self._run(job, plan, info))
        task.add_done_callback(lambda _: self._stopped(job))  # also when cancelled before it ran
        return job.job_id, False

    def _stopped(self, job: RebalanceJob) -> None:
        """The job no longer runs: the next Rebalance of its model starts a new one."""
        if self.running.get(job.model) == job.job_id:
            del self.running[job.model]

    async def _run(self, job: RebalanceJob, plan: RebalancePlan, info: ModelExperts) -> None:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        weight, previous, topology = plan.weight, plan.previous, plan.topology
        try:
            mapping = await loop.run_in_executor(
                self.executor,
                lambda: rebalance_experts(
                    weight,
                    plan.replicas,
                    topology.num_groups,
                    topology.num_nodes,
                    topology.num_gpus,
                    policy=plan.policy,
                    previous=previous,
                    locality=plan.locality,
                ),
            )
            # `previous` is still the mapping in force: only this job, the model's one
            # running job, publishes until it ends.
            job.before, job.after = balancedness(weight, previous), balancedness(weight, mapping)
            # `previous` may be a version 0 made for one node: judge it on the new topology.
            before = ExpertMapping.from_phy2log(previous.phy2log, mapping.num_logical, mapping.topology, 0)
            job.locality_before, job.locality_after = group_locality(before), group_locality(mapping)
            job.dispatch_before = dispatch_nodes(weight, before, plan.topk_group)
            job.dispatch_after = dispatch_nodes(weight, mapping, plan.topk_group)
            job.bound = locality_bound(weight, mapping)
            for gpu in range(topology.num_gpus):
                moved = sum(len(slots) for slots in mapping.delta(previous, gpu))
                job.deltas.append((gpu, moved, moved * info.bytes_per_expert))
            mapping = self._publish(job.model, mapping)
            job.mapping, job.state = mapping, "succeeded"
            logger.info(
                "rebalanced %s to v%d: balancedness %.3f -> %.3f, group locality %.3f, dispatch nodes %.2f",
                job.model,
                mapping.version,
                job.before,
                job.after,
                job.locality_after,
                job.dispatch_after,
            )
        except Exception as e:  # reported through GetRebalance
            job.state, job.error = "failed", str(e)
            logger.warning("rebalance of %s failed: %s", job.model, e)
        job.seconds = time.perf_counter() - started
        self._stopped(job)  # with `ended`, in one step: a caller told the job ended may start the next
        job.ended.set()
        self.recorder.rebalance_finished(
            job.model,
            plan.policy,
            job.state,
            job.seconds,
            job.before,
            job.after,
            locality=(job.locality_before, job.locality_after),
            dispatch=(job.dispatch_before, job.dispatch_after),
            bound=job.bound,
        )
        self._expire_jobs()

    def _expire_jobs(self) -> None:
        """Forget the oldest finished jobs beyond MAX_FINISHED_JOBS (jobs are kept in start order)."""
        finished = [job_id for job_id, job in self.jobs.items() if job.state != "running"]
        for job_id in finished[: max(0, len(finished) - MAX_FINISHED_JOBS)]:
            del self.jobs[job_id]

    async def wait_job(self, job_id: str, seconds: float) -> RebalanceJob:
        """The job once it ends, or as it stands after `seconds` (at most MAX_JOB_WAIT_SECONDS).

        Raises:
            JobNotFoundError: no such job.
        """
        job = self.job(job_id)
        wait = min(seconds, MAX_JOB_WAIT_SECONDS)
        if job.state == "running" and wait > 0:  # NaN and negatives wait not at all
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(job.ended.wait()), wait)
        return job

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
        """Every published mapping of `model` newer than `after_version` (0: the current one on)."""
        await self.experts_of(model)
        condition = self._published.setdefault(model, asyncio.Condition())
        history = self.histories.setdefault(model, MappingHistory())
        if after_version:
            sent = after_version
        else:  # start from the current version
            current = history.latest()
            sent = current.version - 1 if current else -1
        for _ in itertools.count():
            for mapping in history.newer_than(sent):
                sent = mapping.version
                yield mapping
            async with condition:
                if not history.newer_than(sent):
                    await condition.wait()

    def slots(self, spec: ShardSpec, layout: MoeLayout) -> ExpertSlots:
        """The slots EP rank `spec.ep_rank` holds now, and the delta since `spec.since_mapping`.

        Raises:
            InvalidRequestError: the mapping in force is for another number of EP ranks.
            PreconditionError: `since_mapping` names a version this server cannot vouch for.
        """
        current = self.current(spec.model) or start_placement(layout, spec.ep_size, spec.num_redundant_experts)
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
            old = self.mapping(spec.model, spec.since_mapping, layout, spec)
            if (old.num_physical, old.topology.num_gpus) != (current.num_physical, current.topology.num_gpus):
                raise PreconditionError(
                    f"model {spec.model!r}: mapping v{spec.since_mapping} has {old.num_physical} slots on "
                    f"{old.topology.num_gpus} ranks, v{current.version} has {current.num_physical} on "
                    f"{current.topology.num_gpus}: fetch the rank's full share"
                )
            fresh = current.delta(old, spec.ep_rank)
            send = tuple(tuple(p - slots.start for p in layer) for layer in fresh)
        return ExpertSlots(current.version, layout.layers, physical, logical, send, spec.since_mapping is not None)
