"""Python's cyclic garbage collector held off while a fetch makes thousands of objects.

Building a state dict of 10,000 tensors allocates tens of thousands of container
objects (tensors, names, protobuf wrappers) that are all kept. Each 700 allocations
start a collection, and in a process that has imported torch an occasional full
collection walks every live object: measured here, one such pause took ~100 ms in the
middle of a 10 ms `unbind`. None of the new objects is garbage, so collecting while
they are made finds nothing; the collector runs again as usual afterwards.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Disable the cyclic collector for the block (re-enabled after, only if it was enabled)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
