"""vLLM's sharded_state format: a checkpoint saved once per tensor-parallel rank.

Rank r's tensors live in `model-rank-{r}-part-{p}.safetensors`; `weightserve-sharded.json`
records the world size and layout. This package makes such directories: `plan.py`
decides which tensors go in which part, `write.py` writes them, `check.py` checks a
directory (against the canonical checkpoint when given). The server reads them with
the `sharded_state` loader (`weightserve.loaders.sharded_state`), which owns the file
names, and serves each rank its files as they are.
"""

from weightserve.sharding.sharded_state.check import ShardedStateCheck, SourceModel, check_sharded_state
from weightserve.sharding.sharded_state.plan import ShardedStatePlan, plan_sharded_state, rank_plans
from weightserve.sharding.sharded_state.write import write_sharded_state

__all__ = [
    "ShardedStateCheck",
    "ShardedStatePlan",
    "SourceModel",
    "check_sharded_state",
    "plan_sharded_state",
    "rank_plans",
    "write_sharded_state",
]
