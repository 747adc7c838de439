"""Matching a fetched plan to what the caller asked for: tensor names, and an existing nn.Module.

`ModuleLoad` is load_into's logic, shared by the sync and asyncio clients: everything
that can be checked is checked before a byte is fetched, so a module that does not fit
the plan is refused untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import torch

from weightserve import wire
from weightserve.errors import FetchError, InvalidRequestError
from weightserve.v1 import weightserve_pb2 as pb

SHOWN = 5
"""How many offending names an error message lists."""

CASTABLE = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
"""Dtypes a module may hold in place of the checkpoint's (the bytes are cast on copy, as fetch_state_dict's
`dtype` does). Any other difference (integers, bool, float8, which need scales) is refused."""

MODULE_DECIDES = ("device", "dtype", "destinations")
"""FetchOptions load_into refuses: the module's own tensors say where the bytes go and as what."""


def _listed(names: Sequence[str]) -> str:
    return f"{list(names[:SHOWN])}{'...' if len(names) > SHOWN else ''}"


def check_names(manifest: pb.GetManifestResponse, names: Sequence[str] | None, model: str) -> None:
    """Refuse requested names the plan lacks, as the server refuses them (NOT_FOUND), before any stream.

    Without this a request whose names were all unknown fetched nothing and returned {}.

    Raises:
        FetchError: NOT_FOUND naming the first few unknown names.
    """
    if not names:
        return
    known = {t.name for t in manifest.tensors}
    unknown = [n for n in dict.fromkeys(names) if n not in known]
    if unknown:
        raise FetchError(
            f"fetch {model}: NOT_FOUND: {len(unknown)} requested name(s) not in this plan: {_listed(unknown)}",
            grpc.StatusCode.NOT_FOUND,
        )


def module_destinations(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters and persistent buffers by state-dict name, as plain tensors."""
    return {name: tensor.detach() for name, tensor in module.state_dict(keep_vars=True).items()}


def check_keys(targets: Mapping[str, torch.Tensor], names: list[str], model: str) -> None:
    """Raise unless the module and the plan have exactly the same keys."""
    missing = sorted(set(targets) - set(names))
    unexpected = sorted(set(names) - set(targets))
    if missing or unexpected:
        raise InvalidRequestError(
            f"module does not match {model!r}: missing from the server {_listed(missing)}, "
            f"not in the module {_listed(unexpected)}"
        )


class ModuleLoad:
    """One load_into: build it (checks the module), `options(manifest)` (checks it against the plan),
    fetch with those options, then `apply(state)`.

    Destinations that fit exactly (device, dtype, shape, contiguous) receive the bytes
    directly; the rest (another device, a castable dtype, a non-contiguous view) are
    fetched aside and copied in with `Tensor.copy_`, which honours strides. Names tied to
    one storage (a tied embedding) are written once and the others checked against it.

    Raises:
        TypeError: `device`, `dtype` or `destinations` was given.
        InvalidRequestError: the module has tensors on the meta device (deferred init:
            call `module.to_empty(device=...)` first), sparse or self-overlapping
            tensors (an `expand()`ed buffer), or tensors that partly share memory.
    """

    def __init__(self, module: torch.nn.Module, model: str, options: Mapping[str, Any]) -> None:
        given = [key for key in MODULE_DECIDES if key in options]
        if given:
            raise TypeError(f"load_into writes into the module's own tensors: drop {', '.join(given)}")
        self.model = model
        self.targets = module_destinations(module)
        self._refuse(
            [n for n, t in self.targets.items() if t.is_meta],
            "on the meta device (deferred init); allocate them first with module.to_empty(device=...), then load_into",
        )
        self._refuse([n for n, t in self.targets.items() if t.layout != torch.strided], "not dense (strided) tensors")
        self._refuse(
            [n for n, t in self.targets.items() if _overlaps_itself(t)],
            "views whose elements share memory (expand()ed?) and cannot hold distinct values; "
            "give the module tensors of their own (.clone())",
        )
        self.aliases = _aliases(self.targets, model)
        """Tied names: each to the first name of its storage, the one that receives the bytes."""

    def _refuse(self, names: list[str], why: str) -> None:
        if names:
            raise InvalidRequestError(f"cannot load {self.model!r} into the module: {_listed(names)} are {why}")

    def options(self, manifest: pb.GetManifestResponse, options: Mapping[str, Any]) -> dict[str, Any]:
        """fetch_state_dict's options for the load, after checking every name, shape and dtype against the plan.

        The fetch is pinned to the manifest's revision, so a model that changes between this
        check and the fetch fails FAILED_PRECONDITION instead of arriving in other shapes.

        Raises:
            InvalidRequestError: keys differ, or a tensor's shape or dtype cannot hold the plan's.
        """
        check_keys(self.targets, [t.name for t in manifest.tensors], self.model)
        wrong = []
        for info in manifest.tensors:
            dest, dtype = self.targets[info.name], wire.torch_dtype(info.dtype)
            fits = dest.dtype == dtype or (dest.dtype in CASTABLE and dtype in CASTABLE)
            if tuple(dest.shape) != tuple(info.shape) or not fits:
                wrong.append(f"{info.name}: module {_spec(dest.dtype, dest.shape)}, server {_spec(dtype, info.shape)}")
        if wrong:
            raise InvalidRequestError(
                f"module does not match {self.model!r}: {len(wrong)} tensor(s) differ in shape or dtype: "
                f"{'; '.join(wrong[:SHOWN])}{'...' if len(wrong) > SHOWN else ''}"
            )
        pinned = {"revision": manifest.revision} if manifest.revision else {}
        destinations = {n: t for n, t in self.targets.items() if n not in self.aliases}
        return {**options, **pinned, "device": self._device(), "destinations": destinations}

    def _device(self) -> torch.device:
        """Where most of the module's bytes are: tensors elsewhere are fetched there and copied."""
        by_device: dict[torch.device, int] = {}
        for t in self.targets.values():
            by_device[t.device] = by_device.get(t.device, 0) + t.numel() * t.element_size()
        return max(by_device, key=lambda d: by_device[d]) if by_device else torch.device("cpu")

    def apply(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy what did not land in place into the module; check tied names agree.

        Raises:
            InvalidRequestError: a fetched tensor's shape is not its destination's (the plan
                changed underneath), or tied names' checkpoint values differ.
        """
        with torch.no_grad():
            for name, tensor in state.items():
                dest = self.targets[name]
                if tensor.shape != dest.shape:
                    raise InvalidRequestError(
                        f"{self.model!r}: {name} arrived as {list(tensor.shape)}, the module holds {list(dest.shape)}"
                    )
                tied = self.aliases.get(name) in state
                if tensor is not dest and not tied:
                    dest.copy_(tensor)
            for name, primary in self.aliases.items():  # after every primary is in place
                if name in state and primary in state:
                    dest = self.targets[name]
                    if not torch.equal(state[name].to(dest.device, dest.dtype), dest):
                        raise InvalidRequestError(
                            f"{self.model!r}: the module ties {name} to {primary} (one storage), but the "
                            f"checkpoint's values differ; the module holds {primary}'s"
                        )


def _spec(dtype: torch.dtype, shape: Sequence[int]) -> str:
    return f"{str(dtype).removeprefix('torch.')}{list(shape)}"


def _overlaps_itself(tensor: torch.Tensor) -> bool:
    """Whether two elements may share memory (conservative: True for layouts too tangled to tell)."""
    if tensor.is_meta or tensor.layout != torch.strided:
        return False
    reach = 1  # elements spanned by the dimensions seen so far, innermost first
    for stride, size in sorted((st, s) for s, st in zip(tensor.shape, tensor.stride(), strict=True) if s > 1):
        if stride < reach:
            return True
        reach += stride * (size - 1)
    return False


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """The byte range [start, end) a non-empty tensor's elements lie in."""
    extent = sum(st * (s - 1) for s, st in zip(tensor.shape, tensor.stride(), strict=True)) + 1
    return tensor.data_ptr(), tensor.data_ptr() + extent * tensor.element_size()


def _aliases(targets: Mapping[str, torch.Tensor], model: str) -> dict[str, str]:
    """Names whose tensor is exactly another's (tied weights), mapped to the first such name.

    Raises:
        InvalidRequestError: two tensors share part of their memory without being the same view.
    """
    order = {name: i for i, name in enumerate(targets)}
    spans = sorted(
        (str(t.device), *_span(t), order[name], name) for name, t in targets.items() if t.numel() and not t.is_meta
    )
    aliases: dict[str, str] = {}
    held: tuple[str, int, str] | None = None  # device, end and name of the span reaching furthest so far
    for device, start, end, _, name in spans:
        if held is not None and held[0] == device and start < held[1]:
            primary = aliases.get(held[2], held[2])
            a, b = targets[primary], targets[name]
            if (a.data_ptr(), a.shape, a.stride(), a.dtype) != (b.data_ptr(), b.shape, b.stride(), b.dtype):
                raise InvalidRequestError(
                    f"cannot load {model!r} into the module: {name} and {primary} share part of their memory, so "
                    "writing one would change the other"
                )
            aliases[name] = primary
        if held is None or held[0] != device or end > held[1]:
            held = (device, end, name)
    return aliases
