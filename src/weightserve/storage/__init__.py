"""Where checkpoints come from: local roots, and remote back ends by URL scheme.

A back end's module is imported only when the operator allows a source with its
scheme (`--allow-source hf://*` imports the Hugging Face one), so a server that serves
local files never needs huggingface_hub or boto3.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import TYPE_CHECKING

from weightserve.errors import ModelNotFoundError

if TYPE_CHECKING:
    from weightserve.config import ServerConfig
    from weightserve.storage.base import Storage

_BACKENDS: dict[str, Callable[[ServerConfig], Storage]] = {}
_MODULES = {"hf": "weightserve.storage.huggingface", "s3": "weightserve.storage.s3"}


def register_storage(scheme: str) -> Callable[[Callable[[ServerConfig], Storage]], Callable[[ServerConfig], Storage]]:
    """Decorator: make `factory(config)` the back end for `scheme://` names."""

    def wrap(factory: Callable[[ServerConfig], Storage]) -> Callable[[ServerConfig], Storage]:
        _BACKENDS[scheme] = factory
        return factory

    return wrap


def storage_for(scheme: str, config: ServerConfig) -> Storage:
    """Build the back end for `scheme`, importing its module on first use.

    Raises:
        ModelNotFoundError: no back end has that scheme.
    """
    if scheme not in _BACKENDS and scheme in _MODULES:
        import_module(_MODULES[scheme])
    try:
        factory = _BACKENDS[scheme]
    except KeyError:
        raise ModelNotFoundError(f"no storage back end for {scheme}:// (have {sorted(_MODULES)})") from None
    return factory(config)


def allowed_schemes(patterns: tuple[str, ...]) -> set[str]:
    """The schemes an allow-list mentions ('hf://org/*' -> 'hf')."""
    return {p.split("://", 1)[0] for p in patterns if "://" in p}
