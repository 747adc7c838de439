"""FetchFiles sends the files of the model asked for, never those of a model inside it.

A model may hold another ("org/base/checkpoint-100", "team/base/secret-ft"): a token that
reads the outer model but not the inner one must not get the inner one's files by asking
for the outer one, with the default patterns or its own.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from tests.conftest import ServeFn
from weightserve.server.tokens import token_digest
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc

TEAM, DEEP = "team-token", "deep-token"


def write_model(directory: Path, *extra: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.safetensors").write_bytes(b"weights")
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", *extra):
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(f'{{"of": "{directory.name}/{name}"}}')


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    write_model(root / "team" / "base", "tokenizer/tokenizer.json", "notes/deeper/readme.txt")
    write_model(root / "team" / "base" / "secret-ft")  # a model inside a model
    write_model(root / "team" / "base" / "runs" / "checkpoint-100")  # one folder further down
    (root / "team" / "base" / "cfg-only").mkdir()
    (root / "team" / "base" / "cfg-only" / "config.json").write_text("{}")  # a config of its own
    write_model(root / "org" / "a")
    write_model(root / "org" / "b")
    return root


def tokens_file(path: Path) -> Path:
    path.write_text(
        f'[[tokens]]\nname = "team"\nsha256 = "{token_digest(TEAM)}"\nmodels = ["team/*", "org", "org/a"]\n\n'
        f'[[tokens]]\nname = "deep"\nsha256 = "{token_digest(DEEP)}"\nmodels = ["team/**"]\n'
    )
    return path


def paths(stub: pb_grpc.WeightServiceStub, token: str, model: str, *patterns: str) -> set[str]:
    request = pb.FetchFilesRequest(model=model, patterns=list(patterns))
    return {c.path for c in stub.FetchFiles(request, metadata=(("authorization", f"Bearer {token}"),), timeout=10)}


@pytest.mark.fault("missing, unknown or out-of-scope token", cases=6)
def test_files_of_a_nested_model_are_never_sent_with_the_outer_one(root: Path, serve: ServeFn, tmp_path: Path) -> None:
    server = serve(root, auth_tokens=tokens_file(tmp_path / "tokens.toml"))
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.WeightServiceStub(channel)
        top = {"config.json", "generation_config.json", "tokenizer_config.json"}
        assert paths(stub, TEAM, "team/base") == top  # the defaults: top level only
        # Plain sub-folders are the model's own; a nested model's files never come, at any depth.
        plain = top | {"tokenizer/tokenizer.json", "notes/deeper/readme.txt"}
        for token in (TEAM, DEEP):
            assert paths(stub, token, "team/base", "*") == plain
            assert paths(stub, token, "team/base", "secret-ft/*", "runs/*", "runs/*/*", "cfg-only/*") == set()
        assert paths(stub, DEEP, "team/base/secret-ft") == top  # asked for by its own name: its files
        with pytest.raises(grpc.RpcError) as refused:  # ... by a token that covers it
            paths(stub, TEAM, "team/base/secret-ft")
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.fault("missing, unknown or out-of-scope token")
def test_a_folder_of_models_is_no_model_whose_files_to_send(root: Path, serve: ServeFn, tmp_path: Path) -> None:
    server = serve(root, auth_tokens=tokens_file(tmp_path / "tokens.toml"))
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.WeightServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            paths(stub, TEAM, "org", "*")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value.details()
        assert "'org' is not a model" in info.value.details() and "org/b" not in info.value.details()
