"""A stock Node.js gRPC client (fetch_shard.js) fetches a tensor that matches the checkpoint.

Only the .proto and the documented framing are shared with it: it proves that a client
in another language can reassemble and verify a shard. It loads the last released
contract (compat/released/), not proto/: it is a client already in the field, and
today's server must still serve it. Node and the repo's
node_modules are required (`make test` installs them); without them this test fails,
it does not skip.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file

from weightserve import wire
from weightserve.testing import BackgroundServer

ServeFn = Callable[..., BackgroundServer]
REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("fetch_shard.js")
NODE_PACKAGES = ("@grpc/grpc-js", "@grpc/proto-loader")
MODEL = "org/tiny-llama"

pytestmark = pytest.mark.timeout(120)


def node_executable() -> str:
    """The `node` binary, or a failure saying how to get what the test needs."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: install Node.js >= 18 (CI gets it before `make test`)")
    missing = [p for p in NODE_PACKAGES if not (REPO / "node_modules" / p / "package.json").is_file()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing from {REPO / 'node_modules'}: run `make node` (npm install)")
    return node


@pytest.mark.parametrize(
    "tensor",
    [
        "model.embed_tokens.weight",  # several chunks
        "model.layers.1.input_layernorm.weight",  # one small chunk, in the second file
    ],
)
def test_node_client_fetches_tensor(model_root: Path, serve: ServeFn, tensor: str) -> None:
    node = node_executable()
    server = serve(model_root, chunk_bytes=4096)
    run = subprocess.run(
        [node, str(SCRIPT), server.address, MODEL, tensor],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert run.returncode == 0, f"fetch_shard.js failed:\n{run.stderr}{run.stdout}"
    got = json.loads(run.stdout)

    expected = {}
    for path in sorted((model_root / MODEL).glob("*.safetensors")):
        expected.update(load_file(str(path)))
    want = expected[tensor].contiguous()
    raw = want.reshape(-1).view(dtype=wire.torch_dtype("U8")).numpy().tobytes()
    assert got == {
        "name": tensor,
        "dtype": wire.dtype_name(want.dtype),
        "shape": list(want.shape),
        "nbytes": len(raw),
        "crc32c": wire.crc32c(raw),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "chunks": max(1, -(-len(raw) // 4096)),
    }
