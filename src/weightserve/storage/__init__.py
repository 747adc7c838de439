"""Where checkpoints come from: local roots, and remote back ends by URL scheme.

A back end's module is imported only when the operator allows a source with its
scheme (`--allow-source hf://*` imports the Hugging Face one), so a server that serves
local files never needs huggingface_hub or boto3.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from weightserve.registry import Registry

if TYPE_CHECKING:
    from weightserve.config import ServerConfig
    from weightserve.storage.base import Storage

StorageFactory = Callable[["ServerConfig"], "Storage"]

BACKENDS: Registry[StorageFactory] = Registry(
    "storage back end", {"hf": "weightserve.storage.huggingface", "s3": "weightserve.storage.s3"}
)


def register_storage(scheme: str) -> Callable[[StorageFactory], StorageFactory]:
    """Decorator: make `factory(config)` the back end for `scheme://` names."""
    return BACKENDS.register(scheme)


def storage_for(scheme: str, config: ServerConfig) -> Storage:
    """Build the back end for `scheme`, importing its module on first use.

    Raises:
        UnknownNameError: no back end has that scheme.
    """
    return BACKENDS.get(scheme)(config)


def allowed_schemes(patterns: tuple[str, ...]) -> set[str]:
    """The schemes an allow-list mentions ('hf://org/*' -> 'hf')."""
    return {p.split("://", 1)[0] for p in patterns if "://" in p}
