"""The refinement pass: improve a placement by swapping replicas and re-deciding redundant slots.

`refine_swaps` (swaps.py) lowers each layer's top GPU load by swapping slots between hot
and cold GPUs; when no swap helps, `recount_step` (recount.py) moves a redundant replica
from one expert to another. `state.py` holds their shared working state and cost classes;
`align.py` matches a new placement's GPUs to the previous one so few experts move.
"""

from weightserve.eplb.refine.align import match_gpus, match_held, sticky_packing
from weightserve.eplb.refine.state import SwapPreference
from weightserve.eplb.refine.swaps import refine_swaps

__all__ = ["SwapPreference", "match_gpus", "match_held", "refine_swaps", "sticky_packing"]
