"""Build hook: generate the gRPC stubs from proto/ into src/weightserve/v1/.

The stubs are never checked in. The output folder mirrors the proto package
(weightserve.v1), so the generated `from weightserve.v1 import ...` lines work as
they are.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "proto"
OUT_ROOT = ROOT / "src"
STUB_PACKAGE = OUT_ROOT / "weightserve" / "v1"


def generate_stubs() -> list[Path]:
    """Run protoc (from grpcio-tools) over every .proto under proto/.

    Returns:
        The files written, relative to the project root.
    """
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files under {PROTO_ROOT}")
    STUB_PACKAGE.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={OUT_ROOT}",
        f"--pyi_out={OUT_ROOT}",
        f"--grpc_python_out={OUT_ROOT}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    (STUB_PACKAGE / "__init__.py").write_text('"""Generated from proto/weightserve/v1; do not edit."""\n')
    return sorted(p.relative_to(ROOT) for p in STUB_PACKAGE.iterdir() if p.is_file())


class ProtoStubsHook(BuildHookInterface):  # type: ignore[type-arg]
    """Generates stubs before hatchling collects the wheel's files."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if not PROTO_ROOT.is_dir():  # building a wheel from an sdist that already has stubs
            return
        for path in generate_stubs():
            build_data["artifacts"].append(f"/{path.as_posix()}")


if __name__ == "__main__":  # `make proto`
    for written in generate_stubs():
        sys.stdout.write(f"{written}\n")
