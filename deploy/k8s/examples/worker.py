"""Fetch this worker's rank from weightserve at start, onto its GPU.

WEIGHTSERVE_SERVER, WEIGHTSERVE_TOKEN and WEIGHTSERVE_TLS_CA configure the client; MODEL,
RANK and WORLD_SIZE say which slice. A dropped connection resumes where it stopped.
"""

import logging
import os
import pathlib
import signal
import time

from weightserve import WeightClient

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
logger = logging.getLogger("worker")

model, rank, world_size = os.environ["MODEL"], int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
started = time.monotonic()
with WeightClient(os.environ["WEIGHTSERVE_SERVER"]) as client:
    state = client.fetch_state_dict(model, rank=rank, world_size=world_size, device="cuda")
size = sum(t.numel() * t.element_size() for t in state.values())
logger.info(
    "rank %d/%d of %s: %d tensors, %d bytes in %.1fs",
    rank,
    world_size,
    model,
    len(state),
    size,
    time.monotonic() - started,
)
# The engine takes `state` here (model.load_state_dict(state), or vLLM's load_weights);
# this worker holds the tensors on the GPU and marks itself started.
pathlib.Path("/tmp/weights-loaded").touch()
signal.pause()
