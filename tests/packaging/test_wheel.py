"""The wheel built from a clean copy of the tree carries working gRPC stubs.

The stubs are generated at build time (hatch_build.py) and never checked in, so this
is the test that catches a build hook that silently stopped producing them. The copy
holds the files git would commit (tracked plus untracked-but-not-ignored), so it tests
the working tree as it is, before any commit, without the local .venv or stale stubs.
`pip wheel` builds in an isolated environment from [build-system].requires, as any
user's pip would.
"""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STUBS = (
    "weightserve/v1/__init__.py",
    "weightserve/v1/weightserve_pb2.py",
    "weightserve/v1/weightserve_pb2_grpc.py",
)

# Run with `python -S -c CHECK_STUBS WHEEL_DIR SITE_DIR...`: with no .pth files read,
# the editable install's src/ is not on the path; the unpacked wheel comes first and
# the dependencies come from this interpreter's site-packages.
CHECK_STUBS = """
import sys
wheel = sys.argv[1]
sys.path[:0] = [wheel]
sys.path += sys.argv[2:]
from weightserve.v1 import weightserve_pb2 as pb, weightserve_pb2_grpc as pb_grpc

assert pb.__file__.startswith(wheel), pb.__file__
assert pb_grpc.WeightServiceStub and pb_grpc.add_WeightServiceServicer_to_server
chunk = pb.TensorChunk(
    header=pb.TensorHeader(name="w", dtype="BF16", shape=[2, 3], nbytes=12),
    tensor_index=1, offset=0, crc32c=0xDEADBEEF, last=True, tensor_crc32c=7, data=bytes(range(12)),
)
again = pb.TensorChunk.FromString(chunk.SerializeToString())
assert again == chunk and list(again.header.shape) == [2, 3] and again.data == bytes(range(12)), again
print("stubs ok")
"""


def copy_worktree(dest: Path) -> None:
    """Copy the files git would commit (tracked + untracked, not ignored) into dest."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = ROOT / rel
        if src.is_file():  # a tracked file deleted in the working tree is skipped
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.fail(f"{ROOT} is not a git checkout; the wheel test copies the tree with git ls-files")
    tree = tmp_path_factory.mktemp("tree")
    out = tmp_path_factory.mktemp("dist")
    copy_worktree(tree)
    assert not (tree / "src/weightserve/v1").exists(), "generated stubs must stay gitignored"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(out), str(tree)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, f"pip wheel failed:\n{build.stdout[-4000:]}\n{build.stderr[-4000:]}"
    (built,) = out.glob("weightserve-*.whl")
    return built


def test_wheel_contains_generated_stubs(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [s for s in STUBS if s not in names]
    assert not missing, f"{wheel.name} lacks {missing}"
    assert not any(n.startswith(("tests/", "proto/", "compat/")) for n in names)


def test_wheel_is_marked_typed(wheel: Path) -> None:
    # PEP 561: without the marker, mypy in a user's project ignores our annotations.
    assert "weightserve/py.typed" in zipfile.ZipFile(wheel).namelist()


def test_stubs_import_from_the_wheel(wheel: Path, tmp_path: Path) -> None:
    # Unpacked, as pip would lay it out, rather than zip-imported: zipimport cannot
    # import a namespace package, which weightserve is until it has an __init__.py.
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    run = subprocess.run(
        [sys.executable, "-S", "-c", CHECK_STUBS, str(tmp_path / "site"), *site.getsitepackages()],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "stubs ok"
