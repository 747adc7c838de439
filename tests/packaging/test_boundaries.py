"""Import boundaries of src/weightserve, read from the source with `ast`.

The rules come from the design: the client installs little, everything below the
servicers is transport-free, and the leaf modules need nothing but the stdlib. A module
or package that does not exist yet has no imports, so its rule passes.

Every import counts, including ones inside functions and `if TYPE_CHECKING:` blocks.
The layers and the package-to-package rules are also import-linter contracts
(pyproject.toml, run by test_layers.py and `make lint`); what those cannot say, "the
standard library only", is checked here alone.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "weightserve"


def module_name(path: Path) -> str:
    """weightserve/client/__init__.py -> weightserve.client; .../wire.py -> weightserve.wire."""
    parts = path.relative_to(SRC).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_names(source: str, module: str, is_package: bool = False) -> Iterator[str]:
    """Yield the dotted name of everything a module's source imports.

    `from a.b import c` yields `a.b.c` (c may be a module or a name in a.b; either way
    it lives under a.b). Relative imports are resolved against `module`.
    """
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                yield base if alias.name == "*" else f"{base}.{alias.name}"


def modules_under(*names: str) -> list[Path]:
    """Source files of the given modules or packages (dotted names) that exist."""
    found: list[Path] = []
    for name in names:
        path = SRC.joinpath(*name.split("."))
        if path.is_dir():
            found.extend(sorted(path.rglob("*.py")))
        elif path.with_suffix(".py").is_file():
            found.append(path.with_suffix(".py"))
    return found


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(paths: list[Path], allowed: Callable[[str], bool]) -> list[str]:
    """`module imports name` for every import of `paths` that `allowed(name)` rejects."""
    bad = []
    for path in paths:
        module = module_name(path)
        for name in imported_names(path.read_text(), module, path.name == "__init__.py"):
            if not allowed(name):
                bad.append(f"{module} imports {name}")
    return bad


CLIENT_MAY_IMPORT = (
    "weightserve.v1",
    "weightserve.wire",
    "weightserve.errors",
    "weightserve.config",
    "weightserve.atomic",
    "weightserve.addresses",
    "weightserve.client",
)
# grpc, and what pulls grpc in with it: the stubs and the gRPC-facing halves.
TRANSPORT = ("weightserve.v1", "weightserve.server", "weightserve.client")


def is_grpc(name: str) -> bool:
    top = name.split(".", maxsplit=1)[0]
    return top == "grpc" or top.startswith("grpc_") or under(name, TRANSPORT)


def test_scanner_finds_the_package() -> None:
    assert modules_under("weightserve.errors"), f"no weightserve/errors.py under {SRC}"


def test_imported_names_resolves_relative_and_from_imports() -> None:
    source = "import grpc.aio\nfrom . import wire\nfrom ..errors import FetchError\nfrom x import *\n"
    names = list(imported_names(source, "weightserve.client.sync"))
    assert names == ["grpc.aio", "weightserve.client.wire", "weightserve.errors.FetchError", "x"]
    names = list(imported_names("from .base import Loader\n", "weightserve.loaders", is_package=True))
    assert names == ["weightserve.loaders.base.Loader"]


def test_client_imports_only_stubs_wire_and_errors() -> None:
    paths = modules_under("weightserve.client")
    bad = violations(paths, lambda n: not under(n, ("weightserve",)) or under(n, CLIENT_MAY_IMPORT))
    assert not bad, "the client may import only v1, wire, errors, config, atomic and addresses:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "package", ["weightserve.loaders", "weightserve.sharding", "weightserve.cache", "weightserve.eplb"]
)
def test_below_the_servicers_never_imports_grpc(package: str) -> None:
    bad = violations(modules_under(package), lambda n: not is_grpc(n))
    assert not bad, f"{package} must stay transport-free:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("module", "also"),
    [
        ("weightserve.errors", ()),
        ("weightserve.config", ("weightserve.addresses",)),
        ("weightserve.addresses", ()),
        ("weightserve.config_file", ("tomli",)),  # tomli: the stdlib's tomllib, installed on 3.10
        ("weightserve.atomic", ()),
        ("weightserve.registry", ("weightserve.errors",)),
    ],
    ids=["errors", "config", "addresses", "config_file", "atomic", "registry"],
)
def test_leaf_modules_import_stdlib_only(module: str, also: tuple[str, ...]) -> None:
    paths = modules_under(module)
    assert paths, f"no source for {module} under {SRC}"
    bad = violations(paths, lambda n: n.split(".", maxsplit=1)[0] in sys.stdlib_module_names or under(n, also))
    may = " and ".join(("the stdlib", *also))
    assert not bad, f"{module} may import {may} only:\n" + "\n".join(bad)
