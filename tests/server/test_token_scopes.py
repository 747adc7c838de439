"""A token's model globs hold for every request that names a model, in whatever field, for as long
as the call runs: FillReplica's key, and watches whose token is revoked while they wait."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from tests.conftest import ServeFn
from weightserve.errors import UnauthenticatedError
from weightserve.server.request_models import MODEL_OF, UncheckedRequestError, model_of
from weightserve.server.tokens import token_digest
from weightserve.server.watch_guard import while_allowed
from weightserve.storage.disk_cache import DiskCache
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc

MODEL = "org/tiny-llama"
KEY_A, KEY_B = "s3://bucket-a/m@etag-a", "s3://bucket-b/secret-model@etag-b"
REPLICA_A, WORKER, TRAINER = "replica-a-s3cret", "worker-s3cret", "trainer-s3cret"

pytestmark = pytest.mark.timeout(60)


def entry(name: str, secret: str, models: str, extra: str = "") -> str:
    return f'[[tokens]]\nname = "{name}"\nsha256 = "{token_digest(secret)}"\nmodels = [{models}]\n{extra}\n'


# --------------------------------------------------------------- every request's model


def _names_a_model(message: Descriptor, depth: int = 0) -> bool:
    """Whether a message type has, at any depth, a string field that could name a model."""
    for f in message.fields:
        if f.type == FieldDescriptor.TYPE_STRING and f.name in ("model", "key", "source", "repo"):
            return True
        if f.message_type is not None and depth < 4 and _names_a_model(f.message_type, depth + 1):
            return True
    return False


def test_every_request_type_says_where_its_model_is() -> None:
    requests = {m.input_type for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods}
    assert {r.full_name for r in requests} == set(MODEL_OF), "add the new request type to request_models.MODEL_OF"
    unchecked = [r.full_name for r in requests if _names_a_model(r) and MODEL_OF[r.full_name] is None]
    assert unchecked == []
    assert model_of(pb.FillReplicaRequest(key="s3://bucket-b//secret-model/@etag")) == "s3://bucket-b/secret-model"
    with pytest.raises(UncheckedRequestError):
        model_of(pb.TensorInfo(name="a request type nobody listed"))


@pytest.fixture
def replica(tmp_path: Path, serve: ServeFn):  # type: ignore[no-untyped-def]
    """A server whose S3 disk cache holds a copy of a bucket-a model and one of bucket-b's."""
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(entry("replica-a", REPLICA_A, '"s3://bucket-a/**"', "replica = true"))
    cache = DiskCache(tmp_path / "cache" / "s3")
    for key, data in ((KEY_A, b"bucket-a weights"), (KEY_B, b"TEAM-B-SECRET-WEIGHTS")):
        cache.populate_here(key, len(data), lambda d, data=data: (d / "model.safetensors").write_bytes(data))  # type: ignore[misc]
    (tmp_path / "roots").mkdir()
    return serve(
        tmp_path / "roots", metrics_listen="off", allow_source=("s3://bucket-a/*", "s3://bucket-b/*"),
        disk_cache_dir=tmp_path / "cache", auth_tokens=tokens,
    )  # fmt: skip


@pytest.mark.fault("missing, unknown or out-of-scope token", cases=3)
def test_fill_replica_checks_the_model_of_its_key_against_the_tokens_globs(replica) -> None:  # type: ignore[no-untyped-def]
    metadata = (("authorization", f"Bearer {REPLICA_A}"),)
    with grpc.insecure_channel(replica.address) as channel:
        stub = pb_grpc.ReplicaServiceStub(channel)
        got = b"".join(c.data for c in stub.FillReplica(pb.FillReplicaRequest(key=KEY_A), metadata=metadata))
        assert got == b"bucket-a weights"
        for key in (KEY_B, "s3://bucket-b//secret-model/@etag-b"):  # every spelling is the one name
            with pytest.raises(grpc.RpcError) as info:
                list(stub.FillReplica(pb.FillReplicaRequest(key=key), metadata=metadata))
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert info.value.details() == "token 'replica-a' does not cover model 's3://bucket-b/secret-model'"
        with pytest.raises(grpc.RpcError) as info:
            list(stub.FillReplica(pb.FillReplicaRequest(key="s3://bucket-a/m\n@etag-a"), metadata=metadata))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------- watches of a revoked token


@pytest.mark.fault("missing, unknown or out-of-scope token")
def test_a_revoked_tokens_watch_ends_unauthenticated_and_releases_its_lease(
    model_root: Path, serve: ServeFn, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(entry("worker", WORKER, '"org/**"') + entry("trainer", TRAINER, '"org/**"', "publish = true"))
    server = serve(model_root, auth_tokens=tokens, state_dir=tmp_path / "state", metrics_listen="off")
    worker, trainer = (("authorization", f"Bearer {WORKER}"),), (("authorization", f"Bearer {TRAINER}"),)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.VersionServiceStub(channel)
        watch = stub.WatchVersions(pb.WatchVersionsRequest(model=MODEL, serving_version=0), metadata=worker)
        ended: list[grpc.RpcError] = []
        reader = threading.Thread(target=lambda: ended.extend(_drain(watch)), daemon=True)
        reader.start()
        deadline = time.monotonic() + 10
        while _leases(stub, trainer) != [1] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _leases(stub, trainer) == [1]  # the worker's watch leases version 0

        tokens.write_text(entry("trainer", TRAINER, '"org/**"', "publish = true"))  # revoke the worker
        started = time.monotonic()
        reader.join(timeout=10)
        assert ended and ended[0].code() == grpc.StatusCode.UNAUTHENTICATED, ended
        assert "token 'worker' was revoked while this call streamed" in ended[0].details()
        assert time.monotonic() - started < 4  # the file is looked at once a second, the watch asks every second
        assert _leases(stub, trainer) == [0]


def _drain(call: grpc.Call) -> list[grpc.RpcError]:
    try:
        for _ in call:  # type: ignore[attr-defined]
            pass
    except grpc.RpcError as e:
        return [e]
    return []


def _leases(stub: pb_grpc.VersionServiceStub, metadata: tuple[tuple[str, str], ...]) -> list[int]:
    return [v.leases for v in stub.ListVersions(pb.ListVersionsRequest(model=MODEL), metadata=metadata).versions]


def test_a_withdrawn_watch_is_closed_before_the_refusal_so_its_finally_runs() -> None:
    closed: list[str] = []
    allowed = [True]

    async def watch() -> AsyncIterator[int]:
        try:
            yield 1
            await asyncio.Event().wait()  # no next event, ever
            yield 2  # pragma: no cover
        finally:
            closed.append("lease released")

    async def run() -> list[int]:
        got = []
        with pytest.raises(UnauthenticatedError):
            async for n in while_allowed(
                watch(), lambda: None if allowed[0] else UnauthenticatedError("revoked"), 0.01
            ):
                got.append(n)
                allowed[0] = False
        return got

    assert asyncio.run(run()) == [1] and closed == ["lease released"]
