"""Matching a fetched plan to an existing nn.Module."""

from __future__ import annotations

import torch

from weightserve.errors import InvalidRequestError


def module_destinations(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters and persistent buffers by state-dict name, as plain tensors."""
    return {name: tensor.detach() for name, tensor in module.state_dict(keep_vars=True).items()}


def check_keys(targets: dict[str, torch.Tensor], names: list[str], model: str) -> None:
    """Raise unless the module and the plan have exactly the same keys."""
    missing = sorted(set(targets) - set(names))
    unexpected = sorted(set(names) - set(targets))
    if missing or unexpected:
        raise InvalidRequestError(
            f"module does not match {model!r}: missing from the server {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, not in the module {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
