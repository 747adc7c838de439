"""A plan no honest server sends is refused before the client allocates anything from it.

The gRPC path sizes every tensor from the manifest (check_plan); the shared-memory path
takes geometry from its grant's runs (checked in tests/client/test_placements.py) and
checks the manifest's names (tests/integration/test_shared_memory.py). Before these checks an unknown dtype was
a KeyError, a negative dimension a RuntimeError from torch.empty, and a name listed twice
quietly dropped one tensor from the state dict. Each case is tried on the plan assembler
(every client reads its plan through it) and end to end against a server that lies.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import pytest
import torch

from weightserve import AsyncWeightClient, FetchError, WeightClient
from weightserve.client.assembly import FetchSession
from weightserve.client.manifest_pages import check_plan
from weightserve.errors import IntegrityError
from weightserve.v1 import weightserve_pb2 as pb


def _info(name: str = "w", dtype: str = "F32", shape: tuple[int, ...] = (2, 3), nbytes: int = 24) -> pb.TensorInfo:
    return pb.TensorInfo(name=name, dtype=dtype, shape=list(shape), nbytes=nbytes)


def _plan(*tensors: pb.TensorInfo, total: int | None = None, max_chunk: int = 4096) -> pb.GetManifestResponse:
    return pb.GetManifestResponse(
        manifest_id="m1",
        tensors=list(tensors),
        total_bytes=sum(t.nbytes for t in tensors) if total is None else total,
        max_chunk_bytes=max_chunk,
        wire_version=1,
    )


HOSTILE: dict[str, tuple[pb.GetManifestResponse, str]] = {
    "unknown dtype": (_plan(_info(dtype="F128", nbytes=6 * 16)), "unknown dtype 'F128'"),
    "negative dimension": (_plan(_info(shape=(-2, -3), nbytes=24)), r"shape \[-2, -3\] of F32 disagrees"),
    "nbytes past its shape": (_plan(_info(nbytes=1 << 40)), "disagrees with its 1099511627776 bytes"),
    "name listed twice": (_plan(_info("a"), _info("b"), _info("a")), "'a' is listed twice"),
    "nameless tensor": (_plan(_info("")), "without a name"),
    "total_bytes wrong": (_plan(_info(), total=25), "not the sum of its tensors"),
}


@pytest.mark.fault("a manifest no honest server sends", expect="DATA_LOSS naming the entry, before any allocation")
@pytest.mark.parametrize("case", list(HOSTILE))
def test_plan_assembler_refuses_hostile_plans(case: str) -> None:
    plan, message = HOSTILE[case]
    with pytest.raises(FetchError, match=message) as info:
        check_plan(plan, "org/x")
    assert info.value.code() == grpc.StatusCode.DATA_LOSS


def test_honest_plans_pass() -> None:
    check_plan(_plan(_info("a"), _info("scalar", shape=(), nbytes=4), _info("empty", shape=(0, 3), nbytes=0)), "m")


def _lying_server(plan: pb.GetManifestResponse) -> tuple[grpc.Server, str, list[str]]:
    """A WeightService that answers GetManifest with `plan` and records any other call."""
    calls: list[str] = []

    def manifest(request: pb.GetManifestRequest, context: grpc.ServicerContext) -> pb.GetManifestResponse:
        calls.append("GetManifest")
        return plan

    def fetch(request: pb.FetchShardRequest, context: grpc.ServicerContext) -> Iterator[pb.TensorChunk]:
        calls.append("FetchShard")
        context.abort(grpc.StatusCode.INTERNAL, "the client should not have asked")
        yield pb.TensorChunk()

    handlers: dict[str, grpc.RpcMethodHandler] = {
        "GetManifest": grpc.unary_unary_rpc_method_handler(
            manifest, pb.GetManifestRequest.FromString, pb.GetManifestResponse.SerializeToString
        ),
        "FetchShard": grpc.unary_stream_rpc_method_handler(
            fetch, pb.FetchShardRequest.FromString, pb.TensorChunk.SerializeToString
        ),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("weightserve.v1.WeightService", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}", calls


@pytest.fixture
def lying() -> Iterator[Callable[[pb.GetManifestResponse], tuple[str, list[str]]]]:
    servers: list[grpc.Server] = []

    def start(plan: pb.GetManifestResponse) -> tuple[str, list[str]]:
        server, address, calls = _lying_server(plan)
        servers.append(server)
        return address, calls

    yield start
    for server in servers:
        server.stop(None)


@pytest.mark.fault("a server that lies in its manifest", expect="DATA_LOSS from both clients; no stream is opened")
@pytest.mark.parametrize("case", ["unknown dtype", "negative dimension", "name listed twice"])
def test_clients_refuse_a_lying_server(lying, case: str) -> None:
    plan, message = HOSTILE[case]
    address, calls = lying(plan)
    with WeightClient(address, timeout=10) as client, pytest.raises(FetchError, match=message) as info:
        client.fetch_state_dict("org/x")
    assert info.value.code() == grpc.StatusCode.DATA_LOSS

    async def fetch_async() -> None:
        async with AsyncWeightClient(address, timeout=10) as client:
            await client.fetch_state_dict("org/x")

    with pytest.raises(FetchError, match=message):
        asyncio.run(fetch_async())
    assert "FetchShard" not in calls


@pytest.mark.fault(
    "a max_chunk_bytes far past any tensor",
    expect="staging sized by the largest tensor; a chunk over it is an integrity error",
)
def test_device_staging_is_bounded_by_the_plan_not_the_claim() -> None:
    plan = _plan(_info("a"), _info("b", shape=(4,), nbytes=16), max_chunk=(1 << 32) - 1)
    session = FetchSession(plan, None, torch.device("cuda"))  # staging is built on the host, CUDA or not
    assert session._writer is not None
    assert {buffer.numel() for buffer in session._writer.buffers} == {24}
    with pytest.raises(IntegrityError, match="over the plan's max_chunk_bytes"):
        session._writer.write(torch.empty(32, dtype=torch.uint8), 0, memoryview(bytes(32)))
