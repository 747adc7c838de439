"""Checkpoint loaders, one module per format, behind one registry.

Adding a format is one new module that subclasses Loader and registers itself; the
rest of the server only ever sees TensorRecords and Sources.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from weightserve.registry import Registry

if TYPE_CHECKING:
    from weightserve.loaders.base import Loader

# Built-in formats, in the order a model directory with several is served. A saved
# per-rank directory (sharded_state) is recognised before the canonical formats.
# fastsafetensors reads safetensors files, so it is no format of its own: `serve
# --loader fastsafetensors` puts it in place of "safetensors". Dummy weights are no
# directory's format: the operator names each one (loaders/dummy.py).
FORMAT_PREFERENCE: tuple[str, ...] = ("sharded_state", "safetensors", "torch", "gguf")

LOADERS: Registry[type[Loader]] = Registry(
    "loader",
    {
        "sharded_state": "weightserve.loaders.sharded_state",
        "safetensors": "weightserve.loaders.safetensors",
        "torch": "weightserve.loaders.torch_pickle",
        "gguf": "weightserve.loaders.gguf",
        "dummy": "weightserve.loaders.dummy",
        "fastsafetensors": "weightserve.loaders.fastsafetensors",
    },
)


def register_loader(fmt: str) -> Callable[[type[Loader]], type[Loader]]:
    """Class decorator: make `cls` the loader for format `fmt`."""

    def wrap(cls: type[Loader]) -> type[Loader]:
        cls.name = fmt
        return LOADERS.register(fmt)(cls)

    return wrap


def loader_for(fmt: str) -> type[Loader]:
    """The loader class registered for `fmt`, importing its module on first use.

    Raises:
        UnknownNameError: no loader has that name.
    """
    return LOADERS.get(fmt)
