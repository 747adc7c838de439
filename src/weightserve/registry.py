"""Named implementations (loaders, EPLB policies, storage back ends) behind one helper.

A registry maps names to implementations. Built-in ones live in modules imported on
first use (an optional back end's library is imported only when chosen); others
register with the decorator. Every registry answers an unknown name with the same
error, naming the known ones. Stdlib only.

Example:
    >>> shapes: Registry[type] = Registry("shape")
    >>> @shapes.register("box")
    ... class Box: ...
    >>> shapes.get("box") is Box
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from importlib import import_module
from typing import Generic, TypeVar

from weightserve.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> implementations, with lazily imported built-ins.

    Args:
        kind: what the names name, for error messages ("loader", "EPLB policy").
        modules: built-in name -> the module that registers it when imported.
    """

    def __init__(self, kind: str, modules: Mapping[str, str] | None = None) -> None:
        self.kind = kind
        self._modules = dict(modules or {})
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: make the decorated object the implementation called `name`."""

        def wrap(item: T) -> T:
            self._items[name] = item
            return item

        return wrap

    def get(self, name: str) -> T:
        """The implementation called `name`, importing its built-in module on first use.

        Raises:
            UnknownNameError: no implementation has that name (the message lists them).
        """
        if name not in self._items and name in self._modules:
            import_module(self._modules[name])
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(f"no {self.kind} {name!r}; have {self.names()}") from None

    def names(self) -> list[str]:
        """Every name `get` accepts, sorted."""
        return sorted(set(self._items) | set(self._modules))

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._modules

    def unregister(self, name: str) -> None:
        """Remove a registered name (built-in names stay importable)."""
        self._items.pop(name, None)

    @contextmanager
    def registered(self, name: str, item: T) -> Iterator[T]:
        """Register `item` as `name` for the block, then restore what was there (for tests)."""
        before = self._items.get(name)
        self._items[name] = item
        try:
            yield item
        finally:
            if before is None:
                self._items.pop(name, None)
            else:
                self._items[name] = before
