"""TLS, mutual TLS, tokens with scopes, the audit trail and the control port, against real servers."""

from __future__ import annotations

import asyncio
import datetime
import logging
import socket
import ssl
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from safetensors.torch import load_file

from tests.conftest import TINY_LLAMA, ServeFn
from tests.server.test_rpc import assemble, rpc_error, spec
from weightserve import FetchError
from weightserve.client import WeightClient
from weightserve.config import ServerConfig
from weightserve.server.build import build_server
from weightserve.server.tokens import token_digest
from weightserve.testing import Pair, make_ca, make_leaf, utc_now, write_llama_checkpoint
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc

MODEL = "org/tiny-llama"
SECRET = "secret/tiny-llama"
WORKERS, CONTROLLER, LIMITED = "workers-s3cret", "controller-s3cret", "limited-s3cret"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_llama_checkpoint(root / "org" / "tiny-llama", TINY_LLAMA, num_files=1)
    write_llama_checkpoint(root / "secret" / "tiny-llama", TINY_LLAMA, num_files=1, seed=1)
    return root


@dataclass(frozen=True)
class Pki:
    folder: Path
    ca: Pair
    server_cert: Path
    server_key: Path
    ca_file: Path
    client_cert: Path
    client_key: Path

    def read(self, name: str) -> bytes:
        return (self.folder / name).read_bytes()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca()
    server_cert, server_key = make_leaf(ca, "weightserve").write(folder, "server")
    client_cert, client_key = make_leaf(ca, "worker", client=True).write(folder, "client")
    (folder / "ca.crt").write_bytes(ca.cert)
    return Pki(folder, ca, server_cert, server_key, folder / "ca.crt", client_cert, client_key)


def tls_config(pki: Pki, folder: Path, mutual: bool = False) -> dict[str, object]:
    """TLS settings over private copies of the server's files (a test may rotate them)."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "tls.crt", folder / "tls.key"
    cert.write_bytes(pki.server_cert.read_bytes())
    key.write_bytes(pki.server_key.read_bytes())
    return {"tls_cert": cert, "tls_key": key, "tls_client_ca": pki.ca_file if mutual else None}


def write_tokens(path: Path) -> Path:
    path.write_text(
        f"""
[[tokens]]
name = "workers"
sha256 = "{token_digest(WORKERS)}"
models = ["org/*"]

[[tokens]]
name = "controller"
sha256 = "{token_digest(CONTROLLER)}"
models = ["**"]
control = true
cache = true

[[tokens]]
name = "limited"
sha256 = "{token_digest(LIMITED)}"
models = ["org/*"]
max_streams = 1
"""
    )
    return path


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# ---------------------------------------------------------------------------- TLS


@pytest.mark.fault("client without the server's trust, or plaintext to TLS")
def test_tls_serves_bit_identical_weights_and_refuses_plaintext_and_a_wrong_ca(
    root: Path, pki: Pki, serve: ServeFn, tmp_path: Path
) -> None:
    server = serve(root, **tls_config(pki, tmp_path))
    with WeightClient(server.address, root_certificates=pki.ca_file) as client:
        state = client.fetch_state_dict(MODEL)
    (weights,) = (root / MODEL).glob("*.safetensors")
    expected = load_file(weights)
    assert state.keys() == expected.keys() and all(state[k].equal(expected[k]) for k in state)

    for wrong in ({}, {"root_certificates": make_ca("another CA").cert}):
        with WeightClient(server.address, timeout=1, **wrong) as client, pytest.raises(FetchError) as info:  # type: ignore[arg-type]
            client.list_models()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # said as such, not a bare deadline
        assert str(info.value).startswith(f"cannot reach {server.address}: "), str(info.value)


@pytest.mark.fault("client without the server's trust, or plaintext to TLS")
def test_mutual_tls_needs_a_client_certificate_the_ca_signed(
    root: Path, pki: Pki, serve: ServeFn, tmp_path: Path
) -> None:
    server = serve(root, **tls_config(pki, tmp_path, mutual=True))
    good = {"root_certificates": pki.ca_file, "certificate_chain": pki.client_cert, "private_key": pki.client_key}
    with WeightClient(server.address, **good) as client:  # type: ignore[arg-type]
        assert [m.name for m in client.list_models()] == [MODEL, SECRET]

    stranger = make_leaf(make_ca("stranger CA"), "stranger", client=True)
    expired = make_leaf(pki.ca, "old", client=True, not_after=utc_now() - datetime.timedelta(hours=1))
    refused = [
        {"root_certificates": pki.ca_file},  # no client certificate
        {"root_certificates": pki.ca_file, "certificate_chain": stranger.cert, "private_key": stranger.key},
        {"root_certificates": pki.ca_file, "certificate_chain": expired.cert, "private_key": expired.key},
    ]
    for options in refused:
        with WeightClient(server.address, timeout=1, **options) as client, pytest.raises(FetchError) as info:  # type: ignore[arg-type]
            client.list_models()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, options


@pytest.mark.fault("bad or unknown server setting")
def test_an_expired_or_mismatched_server_certificate_stops_the_server_at_start(
    root: Path, pki: Pki, tmp_path: Path
) -> None:
    expired = make_leaf(pki.ca, "weightserve", not_after=utc_now() - datetime.timedelta(minutes=5))
    cert, key = expired.write(tmp_path, "expired")
    with pytest.raises(ValueError, match=r"^--tls-cert .*expired\.crt expired at"):
        build_server(ServerConfig(model_roots=(root,), listen="127.0.0.1:0", tls_cert=cert, tls_key=key))
    with pytest.raises(ValueError, match=r"does not match the certificate"):
        build_server(ServerConfig(model_roots=(root,), listen="127.0.0.1:0", tls_cert=pki.server_cert, tls_key=key))


def test_a_certificate_rotated_mid_stream_lets_the_stream_finish_and_new_connections_see_it(
    root: Path, pki: Pki, serve: ServeFn, tmp_path: Path
) -> None:
    settings = tls_config(pki, tmp_path)
    server = serve(root, chunk_bytes=4096, **settings)
    credentials = grpc.ssl_channel_credentials(pki.ca.cert)
    with grpc.secure_channel(server.address, credentials) as channel:
        stub = pb_grpc.WeightServiceStub(channel)
        manifest = stub.GetManifest(pb.GetManifestRequest(shard=spec(MODEL)))
        stream = stub.FetchShard(pb.FetchShardRequest(shard=spec(MODEL), manifest_id=manifest.manifest_id))
        chunks = [next(stream)]

        rotated = make_leaf(pki.ca, "weightserve-rotated")
        Path(settings["tls_key"]).write_bytes(rotated.key)  # type: ignore[arg-type]
        Path(settings["tls_cert"]).write_bytes(rotated.cert)  # type: ignore[arg-type]
        host, port = server.address.rsplit(":", 1)
        context = ssl.create_default_context(cadata=pki.ca.cert.decode())
        context.set_alpn_protocols(["h2"])
        with context.wrap_socket(socket.create_connection((host, int(port))), server_hostname=host) as tls:
            served = tls.getpeercert(binary_form=True)
        assert served == rotated.certificate.public_bytes(serialization.Encoding.DER)
        with grpc.secure_channel(server.address, credentials) as fresh:  # a new connection, the new pair
            assert len(pb_grpc.WeightServiceStub(fresh).ListModels(pb.ListModelsRequest()).models) == 2

        chunks += list(stream)  # the stream in flight kept its connection and finished
    assert assemble(chunks, manifest).keys() == {t.name for t in manifest.tensors}
    assert server.server is not None and server.server.certificates is not None
    assert server.server.certificates.reloads == 1


# ------------------------------------------------------------------------- tokens


@pytest.fixture
def guarded(root: Path, serve: ServeFn, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A plaintext loopback server with the token file (loopback: clients may send tokens)."""
    return serve(root, auth_tokens=write_tokens(tmp_path / "tokens.toml"))


@pytest.mark.fault("missing, unknown or out-of-scope token")
def test_a_call_without_a_known_token_is_unauthenticated_but_health_stays_open(guarded) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(guarded.address) as channel:
        stub = pb_grpc.WeightServiceStub(channel)
        rpc_error(lambda: stub.ListModels(pb.ListModelsRequest()), grpc.StatusCode.UNAUTHENTICATED, "needs a token")
        rpc_error(
            lambda: stub.ListModels(pb.ListModelsRequest(), metadata=bearer("guess")),
            grpc.StatusCode.UNAUTHENTICATED,
            "^unknown token$",
        )
        rpc_error(
            lambda: list(
                stub.FetchShard(pb.FetchShardRequest(shard=spec(MODEL)), metadata=(("authorization", "Basic x"),))
            ),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        rpc_error(lambda: list(reflection.ServerReflectionInfo(ask)), grpc.StatusCode.UNAUTHENTICATED)
        ask = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        assert list(reflection.ServerReflectionInfo(ask, metadata=bearer(WORKERS)))


@pytest.mark.fault("missing, unknown or out-of-scope token")
def test_a_token_reads_only_its_models_and_refusals_name_nothing_else(guarded) -> None:  # type: ignore[no-untyped-def]
    with WeightClient(guarded.address, token=WORKERS) as client:
        assert [m.name for m in client.list_models()] == [MODEL]
        assert client.fetch_state_dict(MODEL)
        for name in (SECRET, "secret//tiny-llama/", "./secret/tiny-llama"):  # every spelling is the one name
            with pytest.raises(FetchError) as info:
                client.get_manifest(name)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert str(info.value).endswith("token 'workers' does not cover model 'secret/tiny-llama'")
        with pytest.raises(FetchError) as info:
            client.get_manifest("org/no-such-model")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "secret" not in str(info.value)
    with WeightClient(guarded.address, token=CONTROLLER) as client:
        assert [m.name for m in client.list_models()] == [MODEL, SECRET]


@pytest.mark.fault("missing, unknown or out-of-scope token")
def test_cache_and_control_calls_need_their_scopes_and_every_action_is_audited(
    guarded,
    caplog: pytest.LogCaptureFixture,  # type: ignore[no-untyped-def]
) -> None:
    with caplog.at_level(logging.INFO, logger="weightserve.audit"), grpc.insecure_channel(guarded.address) as channel:
        weights, control = pb_grpc.WeightServiceStub(channel), pb_grpc.ControlServiceStub(channel)
        for call, method in (
            (lambda: weights.Evict(pb.EvictRequest(model=MODEL), metadata=bearer(WORKERS)), "Evict"),
            (lambda: weights.Prefetch(pb.PrefetchRequest(model=MODEL), metadata=bearer(WORKERS)), "Prefetch"),
            (lambda: control.Rebalance(pb.RebalanceRequest(model=MODEL), metadata=bearer(WORKERS)), "Rebalance"),
            (
                lambda: control.GetRebalance(pb.GetRebalanceRequest(job_id="x"), metadata=bearer(WORKERS)),
                "GetRebalance",
            ),
        ):
            rpc_error(call, grpc.StatusCode.PERMISSION_DENIED, f"token 'workers' may not call {method} \\(it needs")
        assert weights.Evict(pb.EvictRequest(model=MODEL), metadata=bearer(CONTROLLER)).evicted is False
        rpc_error(
            lambda: weights.Evict(pb.EvictRequest(model="org/none"), metadata=bearer(CONTROLLER)),
            grpc.StatusCode.NOT_FOUND,
        )
        weights.ListModels(pb.ListModelsRequest(), metadata=bearer(CONTROLLER))  # reading is not audited
    lines = [r.getMessage() for r in caplog.records if r.name == "weightserve.audit"]
    assert "token=workers action=Evict model=- outcome=PERMISSION_DENIED" in lines[0]
    assert lines[4] == "token=controller action=Evict model=org/tiny-llama outcome=OK"
    assert lines[5].startswith("token=controller action=Evict model=org/none outcome=NOT_FOUND")
    assert len(lines) == 6
    assert not any(secret in caplog.text for secret in (WORKERS, CONTROLLER))
    metrics = urllib.request.urlopen(f"http://{guarded.server.side.address}/metrics", timeout=10).read().decode()
    assert 'weightserve_auth_refusals_total{reason="scope"} 4.0' in metrics


def test_a_job_of_a_model_outside_the_token_is_not_found() -> None:
    from weightserve.server import auth
    from weightserve.server.control_plane import RebalanceJob
    from weightserve.server.control_servicer import ControlServicer
    from weightserve.server.tokens import Token

    class Plane:
        def job(self, job_id: str) -> RebalanceJob:
            return RebalanceJob(job_id, SECRET)

    class Aborted(Exception):
        pass

    class Context:
        def set_trailing_metadata(self, metadata: object) -> None:
            pass

        async def abort(self, code: grpc.StatusCode, details: str) -> None:
            raise Aborted(code, details)

    async def ask() -> None:
        auth._CALLER.set(Token("org-controller", "", models=("org/*",), control=True))  # as the interceptor does
        await ControlServicer(Plane()).GetRebalance(pb.GetRebalanceRequest(job_id="abc"), Context())  # type: ignore[arg-type]

    with pytest.raises(Aborted) as info:
        asyncio.run(ask())
    code, details = info.value.args
    assert code == grpc.StatusCode.NOT_FOUND and SECRET not in details


@pytest.mark.fault("streams over the per-peer or overall limit")
def test_a_tokens_stream_cap_is_resource_exhausted_with_a_retry_hint(guarded) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(guarded.address) as channel:
        stub = pb_grpc.WeightServiceStub(channel)
        first = stub.FetchShard(pb.FetchShardRequest(shard=spec(MODEL)), metadata=bearer(LIMITED))
        next(first)  # admitted, held open
        second = stub.FetchShard(pb.FetchShardRequest(shard=spec(MODEL)), metadata=bearer(LIMITED))
        with pytest.raises(grpc.RpcError) as info:
            list(second)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "streams of token 'limited', its max_streams" in info.value.details()
        assert dict(info.value.trailing_metadata())["retry-after-ms"] == "2000"
        assert list(stub.FetchShard(pb.FetchShardRequest(shard=spec(MODEL)), metadata=bearer(WORKERS)))  # others go on
        first.cancel()


def test_the_token_file_is_reloaded_when_it_changes(guarded, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "tokens.toml"
    path.write_text(path.read_text().replace(token_digest(WORKERS), token_digest("rotated-workers")))
    assert guarded.server.tokens.reload()  # what SIGHUP does; a change is also seen within a second
    with WeightClient(guarded.address, token="rotated-workers") as client:
        assert [m.name for m in client.list_models()] == [MODEL]
    with WeightClient(guarded.address, token=WORKERS, timeout=2) as client, pytest.raises(FetchError) as info:
        client.list_models()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


# ------------------------------------------------------------------- the control port


def test_the_control_port_serves_control_and_the_data_port_says_where_it_is(root: Path, serve: ServeFn) -> None:
    server = serve(root, control_listen="127.0.0.1:0")
    assert server.control_address != server.address
    with grpc.insecure_channel(server.address) as data, grpc.insecure_channel(server.control_address) as ctl:
        data_weights, ctl_weights = pb_grpc.WeightServiceStub(data), pb_grpc.WeightServiceStub(ctl)
        rpc_error(
            lambda: data_weights.Evict(pb.EvictRequest(model=MODEL)),
            grpc.StatusCode.UNIMPLEMENTED,
            "Evict is served on the control address \\(--control-listen\\)",
        )
        rpc_error(
            lambda: pb_grpc.ControlServiceStub(data).GetRebalance(pb.GetRebalanceRequest(job_id="x")),
            grpc.StatusCode.UNIMPLEMENTED,
        )
        assert ctl_weights.Evict(pb.EvictRequest(model=MODEL)).evicted is False
        rpc_error(
            lambda: pb_grpc.ControlServiceStub(ctl).GetRebalance(pb.GetRebalanceRequest(job_id="x")),
            grpc.StatusCode.NOT_FOUND,
        )
        rpc_error(lambda: ctl_weights.ListModels(pb.ListModelsRequest()), grpc.StatusCode.UNIMPLEMENTED)
        assert data_weights.ListModels(pb.ListModelsRequest()).models
        for channel in (data, ctl):
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


def test_serving_beyond_loopback_with_neither_tls_nor_tokens_warns_once(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def build(listen: str) -> None:  # grpc.aio servers are made on a running loop
        server = build_server(ServerConfig(model_roots=(root,), listen=listen, metrics_listen="off"))
        await server.stop(0)

    with caplog.at_level(logging.WARNING, logger="weightserve.server.build"):
        asyncio.run(build("0.0.0.0:0"))
        asyncio.run(build("127.0.0.1:0"))
    warnings = [r.getMessage() for r in caplog.records if "neither TLS nor tokens" in r.getMessage()]
    assert len(warnings) == 1 and "serving 0.0.0.0:0 with neither TLS nor tokens" in warnings[0]


# ------------------------------------------------------------------------ the CLI


def test_client_commands_take_tls_and_token_flags(
    root: Path, pki: Pki, serve: ServeFn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from weightserve.cli import main

    server = serve(root, auth_tokens=write_tokens(tmp_path / "tokens.toml"), **tls_config(pki, tmp_path / "tls"))
    tls = ["--server", server.address, "--tls-ca", str(pki.ca_file)]
    assert main(["health", *tls]) == 0  # health needs no token
    assert main(["ls", *tls, "--token", WORKERS]) == 0
    out = capsys.readouterr().out
    assert MODEL in out and SECRET not in out
    assert main(["ls", *tls]) == 1
    assert capsys.readouterr().err.startswith("weightserve ls: list models: UNAUTHENTICATED")
    assert main(["ls", "--server", "10.0.0.5:50051", "--token", WORKERS]) == 2
    assert "refusing to send a token in plaintext to 10.0.0.5:50051" in capsys.readouterr().err


def test_the_asyncio_client_takes_the_same_tls_and_token(root: Path, pki: Pki, serve: ServeFn, tmp_path: Path) -> None:
    from weightserve.client import AsyncWeightClient

    server = serve(root, auth_tokens=write_tokens(tmp_path / "tokens.toml"), **tls_config(pki, tmp_path / "tls"))

    async def run() -> list[str]:
        async with AsyncWeightClient(server.address, token=WORKERS, root_certificates=pki.ca.cert) as client:
            state = await client.fetch_state_dict(MODEL)
            assert state
            return [m.name for m in await client.list_models()]

    assert asyncio.run(run()) == [MODEL]


def test_tls_server_name_lets_a_probe_by_address_check_a_certificate_that_names_only_the_service(
    root: Path, pki: Pki, serve: ServeFn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from weightserve.cli import main

    service = "weightserve.weightserve.svc"
    cert, key = make_leaf(pki.ca, service, dns=(service,), ips=()).write(tmp_path, "service")
    server = serve(root, tls_cert=cert, tls_key=key)
    tls = ["--server", server.address, "--tls-ca", str(pki.ca_file)]
    assert main(["health", *tls]) == 1  # 127.0.0.1 is not a name the certificate carries
    capsys.readouterr()
    assert main(["health", *tls, "--tls-server-name", service]) == 0
    assert "SERVING" in capsys.readouterr().out
    assert main(["ls", *tls, "--tls-server-name", service]) == 0
    assert MODEL in capsys.readouterr().out
