"""A rank's plan: which tensors it receives, each as pieces of the checkpoint's files.

`plan_shard` composes the planning modules: pipeline stages pick the layers, the
slicing rules cut each tensor for the tensor-parallel rank, expert parallelism picks
whole experts by slot, and the vLLM layout fuses the slices into run-time tensors. A
checkpoint saved per rank (sharded_state) is served file-for-file instead.
"""

from __future__ import annotations

from weightserve.errors import InvalidRequestError, PreconditionError
from weightserve.loaders.base import ShardedState, TensorRecord
from weightserve.sharding.experts import ExpertSlots, expert_plans, is_expert, moe_layout
from weightserve.sharding.layouts import to_vllm
from weightserve.sharding.model_config import ModelConfig
from weightserve.sharding.rules import RuleSet
from weightserve.sharding.slicing import slice_tensor
from weightserve.sharding.spec import ShardSpec
from weightserve.sharding.stages import in_stage, stream_order
from weightserve.sharding.tensor_plan import TensorPlan, whole_tensor


def plan_shard(
    records: list[TensorRecord],
    spec: ShardSpec,
    config: ModelConfig | None = None,
    rules: RuleSet | None = None,
    sharded: ShardedState | None = None,
    experts: ExpertSlots | None = None,
) -> list[TensorPlan]:
    """The tensors rank `spec` receives, in stream order (embeddings, layers, head).

    At world_size 1, pp_size 1 with the checkpoint layout the model is served exactly
    as saved; otherwise every tensor is placed by a rule (see rules.py). With
    expert parallelism (`spec.ep_size`), `experts` says which expert slots the rank
    holds: those experts come whole, everything else is TP-sliced; when `experts`
    sends only a delta, nothing else is sent.

    Raises:
        InvalidRequestError: the model cannot be split as asked.
    """
    config = config or ModelConfig()
    rules = rules or RuleSet()
    if sharded is not None:
        return stream_order([whole_tensor(r) for r in _sharded_rank(sharded, spec)])
    expert_part: list[TensorPlan] = []
    if spec.ep_size:
        layout = moe_layout(records, config.num_experts)
        if layout is None or experts is None:
            raise InvalidRequestError(f"model {spec.model!r} has no experts to spread over ep_size {spec.ep_size}")
        stage = {r.name for r in in_stage(records, spec, config)}
        expert_part = expert_plans([r for r in records if r.name in stage], layout, experts)
        if experts.delta_only:
            return stream_order(expert_part)
        records = [r for r in records if not is_expert(r.name)]
    elif spec.world_size == 1 and spec.pp_size == 1 and spec.layout == "checkpoint":
        return stream_order([whole_tensor(r) for r in records])
    selected = in_stage(records, spec, config)
    plans = [
        slice_tensor(r, rules.rule_for(r.name, config.model_type), config, spec.rank, spec.world_size) for r in selected
    ]
    plans += expert_part
    if spec.layout == "vllm":
        plans = to_vllm(plans)
    return stream_order(plans)


def _sharded_rank(sharded: ShardedState, spec: ShardSpec) -> tuple[TensorRecord, ...]:
    if spec.world_size != sharded.world_size:
        raise PreconditionError(
            f"model {spec.model!r} is saved as sharded_state for world_size {sharded.world_size}; "
            f"asked for world_size {spec.world_size}: serve the canonical checkpoint for other sizes"
        )
    if spec.layout != sharded.layout or spec.pp_size != 1 or spec.ep_size:
        raise PreconditionError(
            f"model {spec.model!r} is saved as sharded_state with layout {sharded.layout!r} and no pipeline "
            f"or expert parallelism; asked for layout {spec.layout!r}, pp_size {spec.pp_size}, "
            f"ep_size {spec.ep_size}"
        )
    return sharded.records_by_rank[spec.rank]
