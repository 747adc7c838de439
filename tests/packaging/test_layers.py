"""The import contracts hold, and no function-level import dodges them.

The contracts live in pyproject.toml ([tool.importlinter]) and `make lint` runs them;
running them here too means `make test` alone catches a broken layer. A contract
counts imports inside functions, so moving an import into a function does not get
around it; the last test keeps such imports for the places that import lazily on
purpose.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
PACKAGE = SRC / "weightserve"

# lint-imports from this interpreter; --no-cache keeps .import_linter_cache out of the tree.
LINT_IMPORTS = (
    "import sys\n"
    "from importlinter.cli import lint_imports\n"
    "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))\n"
)

# Where a function may import weightserve modules: the package root's lazy client
# attributes, the CLI's lazy subcommands, and the registry, which imports built-ins on
# first use. Anywhere else a function-level import of our own code is hiding a cycle
# or a layer break; import at the top and fix the cycle instead. Optional third-party
# backends (torch, boto3, gguf, ...) may be imported in functions anywhere.
LAZY_IMPORTS_ALLOWED = ("weightserve/__init__.py", "weightserve/cli/", "weightserve/registry.py")


def run_lint_imports(cwd: Path, src: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports over the weightserve package found first under `src`."""
    return subprocess.run(
        [sys.executable, "-c", LINT_IMPORTS],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(src)},  # ahead of the editable install's src/
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_import_contracts_are_kept() -> None:
    run = run_lint_imports(ROOT, SRC)
    assert run.returncode == 0, f"lint-imports failed:\n{run.stdout[-8000:]}{run.stderr[-4000:]}"
    assert "0 broken" in run.stdout, run.stdout


def test_contracts_catch_a_function_level_upward_import(tmp_path: Path) -> None:
    # A copy of the package with loaders importing the server inside a function: the
    # layers contract must see it, so the contracts are not passing vacuously.
    shutil.copytree(PACKAGE, tmp_path / "src/weightserve", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    planted = tmp_path / "src/weightserve/loaders/base.py"
    planted.write_text(planted.read_text() + "\n\ndef _planted() -> None:\n    import weightserve.server\n")
    run = run_lint_imports(tmp_path, tmp_path / "src")
    assert run.returncode != 0, run.stdout
    assert "weightserve.loaders is not allowed to import weightserve.server" in run.stdout, run.stdout


def function_level_imports(source: str, module: str, is_package: bool = False) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every import inside a function body, relative ones resolved."""
    package = module if is_package else module.rpartition(".")[0]
    seen: set[int] = set()
    for func in ast.walk(ast.parse(source)):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if id(node) in seen:  # nested functions are walked from each enclosing one
                continue
            seen.add(id(node))
            if isinstance(node, ast.Import):
                yield from ((node.lineno, alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    anchor = ".".join(parts[: len(parts) - node.level + 1])
                    base = f"{anchor}.{base}" if base else anchor
                yield node.lineno, base


def test_function_level_imports_scanner() -> None:
    source = (
        "import os\n"
        "def f():\n"
        "    import torch\n"
        "    from . import wire\n"
        "    def g():\n"
        "        from ..errors import FetchError\n"
        "async def h():\n"
        "    from weightserve.server import data_plane\n"
    )
    found = list(function_level_imports(source, "weightserve.client.sync"))
    assert sorted(found) == [
        (3, "torch"),
        (4, "weightserve.client"),
        (6, "weightserve.errors"),
        (8, "weightserve.server"),
    ]


def test_no_function_level_imports_of_our_own_modules() -> None:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith(("weightserve/v1/", *LAZY_IMPORTS_ALLOWED)):
            continue
        parts = path.relative_to(SRC).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for line, name in function_level_imports(path.read_text(), module, path.name == "__init__.py"):
            if name == "weightserve" or name.startswith("weightserve."):
                bad.append(f"src/{rel}:{line}: imports {name} inside a function")
    assert not bad, "function-level imports of weightserve modules (import at the top):\n" + "\n".join(bad)
