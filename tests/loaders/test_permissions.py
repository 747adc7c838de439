"""Files the server may not read: FAILED_PRECONDITION naming the file, and listings go on.

Each case denies one file of a model (an index json, a weight file, config.json, a
tokenizer file) and checks the error at the loader level and over gRPC: a
PreconditionError whose message names the file by its base name only (never the
server's directory) and says the server may not read it; ListModels skips the model
and lists the others.

As a normal user `deny` is chmod 000. CI runs as root, where chmod stops no read, so
there `deny` makes the calls the code opens files with (os.open, open, io.open) fail
with EACCES for the denied paths only, and the tests check that the code really was
refused; `test_real_eacces_as_root_without_the_override_capabilities` also runs the
loaders and a server in a child that gives up root's right to read any file, against
files that really are mode 000.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from tests.conftest import TINY_LLAMA, ServeFn
from weightserve.errors import CorruptCheckpointError, PreconditionError, WeightserveError
from weightserve.loaders.access import reading, unreadable
from weightserve.loaders.discovery import files_from_index
from weightserve.loaders.dummy import read_config
from weightserve.loaders.formats import available_formats, model_files
from weightserve.loaders.safetensors import SafetensorsLoader
from weightserve.loaders.sharded_state import METADATA_NAME, read_metadata
from weightserve.loaders.torch_pickle import TorchLoader, _load
from weightserve.server.file_stream import FilePiece, _file_pieces
from weightserve.sharding.model_config import ModelConfig
from weightserve.testing import write_llama_checkpoint
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc

AS_ROOT = os.geteuid() == 0
INDEX = "model.safetensors.index.json"
WEIGHT = "model-00001-of-00002.safetensors"
DENIED = r"the server may not read this file \(permission denied\)"


class Deny:
    """Makes paths unreadable to this process; `refused(path)` says whether a read was refused."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.denied: dict[str, int] = {}
        self.chmodded: list[tuple[Path, int]] = []
        if AS_ROOT:
            self._patch(monkeypatch)

    def __call__(self, path: Path) -> None:
        if AS_ROOT:
            self.denied[os.path.realpath(path)] = 0
        else:
            self.chmodded.append((path, path.stat().st_mode))
            path.chmod(0)

    def refused(self, path: Path) -> bool:
        return not AS_ROOT or self.denied[os.path.realpath(path)] > 0

    def restore(self) -> None:
        for path, mode in self.chmodded:
            path.chmod(mode)

    def _check(self, file: Any) -> None:
        if isinstance(file, (str, bytes, os.PathLike)):
            real = os.path.realpath(os.fsdecode(file))
            if real in self.denied:
                self.denied[real] += 1
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(file))

    def _patch(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_os_open, real_open = os.open, builtins.open

        def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            self._check(path)
            return real_os_open(path, flags, *args, **kwargs)

        def open_(file: Any, *args: Any, **kwargs: Any) -> Any:
            self._check(file)
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)


@pytest.fixture
def deny(monkeypatch: pytest.MonkeyPatch) -> Iterator[Deny]:
    denier = Deny(monkeypatch)
    yield denier
    denier.restore()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """org/ok and org/locked, two tiny Llamas; org/locked also has a tokenizer.json."""
    models = tmp_path / "models"
    for name in ("ok", "locked"):
        write_llama_checkpoint(models / "org" / name, TINY_LLAMA, num_files=2)
    (models / "org" / "locked" / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}}))
    return models


def precondition(call: Callable[[], object], name: str, root: Path) -> PreconditionError:
    """`call` raises PreconditionError naming `name` (base name only); the error."""
    with pytest.raises(PreconditionError, match=rf"^{name}: {DENIED}") as info:
        call()
    assert str(root) not in str(info.value)
    return info.value


# ------------------------------------------------------------------- the helper


def test_unreadable_names_the_base_name_only() -> None:
    error = unreadable(Path("/srv/models/org/x/config.json"))
    assert isinstance(error, PreconditionError)
    assert str(error).startswith("config.json: the server may not read this file")
    assert "/srv" not in str(error)


def test_reading_names_the_file_the_os_refused_and_passes_our_errors_through(tmp_path: Path) -> None:
    with pytest.raises(PreconditionError, match=r"^inner\.json: "), reading(tmp_path):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "inner.json"))
    with pytest.raises(PreconditionError, match=rf"^{tmp_path.name}: "), reading(tmp_path):
        raise PermissionError(errno.EPERM, "Operation not permitted")
    from weightserve.errors import PermissionDeniedError

    with pytest.raises(PermissionDeniedError), reading(tmp_path):
        raise PermissionDeniedError("a token without the scope")


# ------------------------------------------------------------------ loader level


@pytest.mark.fault("unreadable checkpoint file (permissions)")
def test_unreadable_index_at_the_loader_level(root: Path, deny: Deny) -> None:
    model = root / "org" / "locked"
    deny(model / INDEX)
    precondition(lambda: files_from_index(model, INDEX), INDEX, root)
    precondition(lambda: SafetensorsLoader.find_files(model), INDEX, root)
    precondition(lambda: available_formats(model), INDEX, root)
    precondition(lambda: model_files(model), INDEX, root)
    assert deny.refused(model / INDEX)
    assert available_formats(root / "org" / "ok") == ["safetensors"]


@pytest.mark.fault("unreadable checkpoint file (permissions)")
def test_unreadable_weight_file_at_the_loader_level(root: Path, deny: Deny) -> None:
    model = root / "org" / "locked"
    files = model_files(model).files
    deny(model / WEIGHT)
    precondition(lambda: SafetensorsLoader(files), WEIGHT, root)
    assert deny.refused(model / WEIGHT)


@pytest.mark.fault("unreadable checkpoint file (permissions)")
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_unreadable_torch_file_is_a_precondition_not_data_loss(tmp_path: Path, deny: Deny, zip_format: bool) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.arange(6.0)}, path, _use_new_zipfile_serialization=zip_format)
    deny(path)
    precondition(lambda: TorchLoader([path]), "pytorch_model.bin", tmp_path)
    # torch.load itself meeting the permission error (the loader opens the file first)
    error = precondition(lambda: _load(path, mmap=zip_format), "pytorch_model.bin", tmp_path)
    assert not isinstance(error, CorruptCheckpointError)
    assert deny.refused(path)


@pytest.mark.fault("unreadable checkpoint file (permissions)")
def test_unreadable_gguf_file(tmp_path: Path, deny: Deny) -> None:
    from tests.loaders.gguf_fixtures import write_llama_gguf
    from weightserve.loaders.gguf import GGUFLoader

    (path,) = write_llama_gguf(tmp_path / "gguf").files
    deny(path)
    precondition(lambda: GGUFLoader([path]), path.name, tmp_path)
    assert deny.refused(path)


@pytest.mark.fault("unreadable checkpoint file (permissions)")
def test_unreadable_sharded_state_metadata(tmp_path: Path, deny: Deny) -> None:
    meta = tmp_path / METADATA_NAME
    meta.write_text(json.dumps({"world_size": 1, "layout": "hf"}))
    assert read_metadata(tmp_path, 1) == (1, "hf", {})
    deny(meta)
    precondition(lambda: read_metadata(tmp_path, 1), METADATA_NAME, tmp_path)


@pytest.mark.fault("unreadable checkpoint file (permissions)")
def test_unreadable_dummy_config(tmp_path: Path, deny: Deny) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_LLAMA.config_json()))
    deny(config)
    precondition(lambda: read_config(config), "config.json", tmp_path)


@pytest.mark.fault("unreadable checkpoint file (permissions)")
def test_unreadable_config_json_is_not_reported_as_bad_json(root: Path, deny: Deny) -> None:
    model = root / "org" / "locked"
    deny(model / "config.json")
    error = precondition(lambda: ModelConfig.from_dir(model), "config.json", root)
    assert "JSON" not in str(error)
    assert deny.refused(model / "config.json")


def test_other_read_errors_of_config_json_never_show_the_full_path(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(CorruptCheckpointError, match=r"^config\.json: not valid JSON") as info:
        ModelConfig.from_dir(tmp_path)
    assert str(tmp_path) not in str(info.value)


@pytest.mark.fault("unreadable checkpoint file (permissions)")
def test_unreadable_tokenizer_file_while_streaming_files(root: Path, deny: Deny) -> None:
    path = root / "org" / "locked" / "tokenizer.json"
    deny(path)
    pieces: Iterator[FilePiece] = _file_pieces("tokenizer.json", path, 1024)
    precondition(lambda: next(pieces), "tokenizer.json", root)
    assert deny.refused(path)


# ------------------------------------------------------------------ over gRPC


@pytest.fixture
def weights(serve: ServeFn, root: Path) -> Iterator[pb_grpc.WeightServiceStub]:
    with grpc.insecure_channel(serve(root).address) as channel:
        yield pb_grpc.WeightServiceStub(channel)


def manifest(stub: pb_grpc.WeightServiceStub, model: str) -> pb.GetManifestResponse:
    return stub.GetManifest(pb.GetManifestRequest(shard=pb.ShardSpec(model=model)))


def failed_precondition(call: Callable[[], object], name: str, root: Path) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    error: Any = info.value
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
    assert error.details().startswith(f"{name}: the server may not read this file"), error.details()
    assert str(root) not in error.details()
    return str(error.details())


def listed(stub: pb_grpc.WeightServiceStub) -> list[str]:
    return [m.name for m in stub.ListModels(pb.ListModelsRequest()).models]


@pytest.mark.fault("unreadable checkpoint file (permissions)")
def test_grpc_unreadable_index_skips_the_model_in_listings(
    root: Path, deny: Deny, weights: pb_grpc.WeightServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    deny(root / "org" / "locked" / INDEX)
    with caplog.at_level(logging.WARNING):
        assert listed(weights) == ["org/ok"]
    assert any("org/locked" in r.getMessage() and INDEX in r.getMessage() for r in caplog.records)
    failed_precondition(lambda: manifest(weights, "org/locked"), INDEX, root)
    assert manifest(weights, "org/ok").tensors
    assert deny.refused(root / "org" / "locked" / INDEX)


@pytest.mark.fault("unreadable checkpoint file (permissions)")
def test_grpc_unreadable_weight_file(root: Path, deny: Deny, weights: pb_grpc.WeightServiceStub) -> None:
    deny(root / "org" / "locked" / WEIGHT)
    failed_precondition(lambda: manifest(weights, "org/locked"), WEIGHT, root)
    assert "org/ok" in listed(weights)
    assert manifest(weights, "org/ok").tensors


@pytest.mark.fault("unreadable checkpoint file (permissions)")
def test_grpc_unreadable_config_json(root: Path, deny: Deny, weights: pb_grpc.WeightServiceStub) -> None:
    deny(root / "org" / "locked" / "config.json")
    failed_precondition(lambda: manifest(weights, "org/locked"), "config.json", root)
    assert manifest(weights, "org/ok").tensors


@pytest.mark.fault("unreadable checkpoint file (permissions)")
def test_grpc_unreadable_tokenizer_file(root: Path, deny: Deny, weights: pb_grpc.WeightServiceStub) -> None:
    deny(root / "org" / "locked" / "tokenizer.json")
    failed_precondition(
        lambda: list(weights.FetchFiles(pb.FetchFilesRequest(model="org/locked"))), "tokenizer.json", root
    )
    request = pb.FetchFilesRequest(model="org/locked", patterns=["config.json"])
    assert {c.path for c in weights.FetchFiles(request)} == {"config.json"}
    assert deny.refused(root / "org" / "locked" / "tokenizer.json")


# ---------------------------------------------------- root: a real EACCES, in a child

_CHILD = """
import ctypes, json, os, sys
from pathlib import Path

if not os.environ.get("CAPS_DROPPED"):
    # Root reads mode-000 files through CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH: take them
    # out of the bounding set and exec again, so this process runs without them.
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            sys.exit(f"cannot drop capability {cap}: errno {ctypes.get_errno()}")
    os.environ["CAPS_DROPPED"] = "1"
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[1], *sys.argv[1:]])

import grpc
from weightserve.config import ServerConfig
from weightserve.loaders.formats import model_files
from weightserve.loaders.safetensors import SafetensorsLoader
from weightserve.loaders.torch_pickle import TorchLoader
from weightserve.sharding.model_config import ModelConfig
from weightserve.testing import BackgroundServer
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc

root = Path(sys.argv[2])
org = root / "org"
out = {}
calls = {
    "index": lambda: model_files(org / "index"),
    "weight": lambda: SafetensorsLoader(sorted((org / "weight").glob("*.safetensors"))),
    "torch": lambda: TorchLoader([org / "torch" / "pytorch_model.bin"]),
    "config": lambda: ModelConfig.from_dir(org / "config"),
}
for case, call in calls.items():
    try:
        call()
        out[case] = "no error"
    except Exception as e:
        out[case] = f"{type(e).__name__}: {e}"
with BackgroundServer(ServerConfig(model_roots=(root,), listen="127.0.0.1:0")) as server:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.WeightServiceStub(channel)
        out["listed"] = [m.name for m in stub.ListModels(pb.ListModelsRequest()).models]
        def manifest(name):
            return stub.GetManifest(pb.GetManifestRequest(shard=pb.ShardSpec(model=f"org/{name}")))

        rpcs = {f"rpc-{n}": lambda n=n: manifest(n) for n in ("ok", "index", "weight", "config", "torch")}
        rpcs["rpc-tokenizer"] = lambda: list(stub.FetchFiles(pb.FetchFilesRequest(model="org/ok")))
        for case, call in rpcs.items():
            try:
                call()
                out[case] = "OK"
            except grpc.RpcError as e:
                out[case] = f"{e.code().name}: {e.details()}"
print(json.dumps(out))
"""


@pytest.mark.fault("unreadable checkpoint file (permissions)")
@pytest.mark.skipif(not AS_ROOT, reason="the other tests already meet a real EACCES when not root")
def test_real_eacces_as_root_without_the_override_capabilities(tmp_path: Path) -> None:
    org = tmp_path / "models" / "org"
    for case in ("ok", "index", "weight", "config"):
        write_llama_checkpoint(org / case, TINY_LLAMA, num_files=2)
    (org / "ok" / "tokenizer.json").write_text("{}")
    (org / "torch").mkdir()
    torch.save({"w": torch.arange(4.0)}, org / "torch" / "pytorch_model.bin")
    for denied in ("index/" + INDEX, "weight/" + WEIGHT, "config/config.json", "torch/pytorch_model.bin"):
        (org / denied).chmod(0)
    (org / "ok" / "tokenizer.json").chmod(0)

    result = subprocess.run(
        [sys.executable, "-c", _CHILD, _CHILD, str(tmp_path / "models")],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )

    if result.returncode != 0 and "cannot drop capability" in result.stderr:
        pytest.skip(result.stderr.strip())
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    names = {"index": INDEX, "weight": WEIGHT, "torch": "pytorch_model.bin", "config": "config.json"}
    for case, name in names.items():
        assert out[case].startswith(f"PreconditionError: {name}: the server may not read this file"), out[case]
        rpc = out[f"rpc-{case}"]
        assert rpc.startswith(f"FAILED_PRECONDITION: {name}: the server may not read this file"), rpc
        assert str(tmp_path) not in out[case] + rpc
    assert out["rpc-tokenizer"].startswith("FAILED_PRECONDITION: tokenizer.json: the server may not read"), out
    assert out["rpc-ok"] == "OK"
    assert out["listed"] == ["org/config", "org/ok", "org/torch", "org/weight"]


def test_preconditions_are_weightserve_errors() -> None:
    # data_plane's listing skips a model on WeightserveError: the unreadable error must be one.
    assert isinstance(unreadable("x"), WeightserveError)
