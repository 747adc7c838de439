"""Random requests at a live, memory-capped server: every answer is a proper status, and it still serves.

hypothesis draws requests of every RPC with fields anywhere in their wire ranges (sizes
up to 2^31-1, names of any length and alphabet, resume points, control calls, junk load
tables) and sends them to a `weightserve serve` process running under a memory cap
(a memory cgroup where this machine allows it, as it does for root; RLIMIT_DATA
otherwise). No answer may be INTERNAL or UNKNOWN (an unhandled error), the process must
live through all of them within its cap, and afterwards serve a normal fetch bit for bit.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.faultkit import assert_bit_identical, free_port, load_checkpoint, wait_serving
from tests.integration.memory_cap import memory_cgroup, peak_usage, start_capped
from weightserve.client import WeightClient
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc

LIMIT = 1536 << 20
"""The server's memory cap: a few times what it needs for these tiny models."""
MODELS = ["org/tiny-llama", "org/tiny-mixtral", "org//tiny-llama/", "./org/tiny-mixtral", "org/missing"]
BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
SERVE = "import sys; from weightserve.cli import main; sys.exit(main(sys.argv[1:]))"

pytestmark = [pytest.mark.timeout(240), pytest.mark.fault("random requests of every RPC at a memory-capped server")]


@pytest.fixture(scope="module")
def capped_server(model_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from tests.server.test_experts import root as moe_fixture

    moe_root = moe_fixture.__wrapped__(tmp_path_factory)  # type: ignore[attr-defined]
    port = free_port()
    argv = [sys.executable, "-c", SERVE, "serve", "--model-root", str(model_root), "--model-root", str(moe_root)]
    argv += ["--listen", f"127.0.0.1:{port}", "--cache-memory", "96MiB", "--grace-seconds", "1"]
    argv += ["--stream-idle-seconds", "5", "--log-level", "WARNING", "--metrics-listen", "off"]
    log = tmp_path_factory.mktemp("hostile") / "server.log"
    with memory_cgroup(LIMIT) as group, log.open("wb") as out:
        proc, how = start_capped(argv, group, LIMIT, stdout=out, stderr=out)
        try:
            address = f"127.0.0.1:{port}"
            wait_serving(address, 60, lambda: None if proc.poll() is None else f"exited {proc.returncode}")
            channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 16 << 20)])
            yield {
                "proc": proc,
                "how": how,
                "group": group,
                "address": address,
                "weights": pb_grpc.WeightServiceStub(channel),
                "control": pb_grpc.ControlServiceStub(channel),
                "log": log,
                "root": model_root,
            }
            channel.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            finally:
                proc.kill()


int32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, 1, 2, 3, 4, 8, 2**31 - 1, -1]))
small = st.integers(0, 16)
text = st.one_of(st.text(max_size=40), st.sampled_from(["", "a/" * 2**14, "x" * 5000, "\x00", "../.."]))
long_part = st.builds(
    lambda prefix, size, char: prefix + char * (min(size, 1024 - len(prefix)) // len(char.encode())),
    st.sampled_from(["", "org/", "org/tiny-llama/", "a/" * 20]),
    st.integers(256, 1024),
    st.sampled_from(["x", "\u00e9", "\U0001f600"]),
)
"""Names within the 1 KiB and 32-part limits whose one part is over the file systems' 255 bytes."""
model = st.one_of(st.sampled_from(MODELS), text, long_part)


def shard_specs() -> st.SearchStrategy[pb.ShardSpec]:
    return st.builds(
        pb.ShardSpec,
        model=model,
        revision=st.one_of(st.just(""), text),
        format=st.sampled_from(["", "safetensors", "torch", "gguf", "dummy", "sharded_state", "onnx"]),
        rank=st.one_of(small, int32),
        world_size=st.one_of(small, int32),
        pp_rank=st.one_of(small, int32),
        pp_size=st.one_of(small, int32),
        ep_rank=st.one_of(small, int32),
        ep_size=st.one_of(small, int32),
        layout=st.integers(0, 4),
        num_redundant_experts=st.one_of(small, int32),
        since_mapping=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    )


def requests() -> st.SearchStrategy[tuple[str, str, Any]]:
    counts = st.lists(st.one_of(st.integers(0, 100), st.integers(-(2**63), 2**63 - 1)), max_size=40)
    load = st.builds(
        pb.ExpertCounts, moe_layers=st.one_of(small, int32), experts=st.one_of(small, int32), counts=counts
    )
    topology = st.builds(pb.ExpertTopology, num_nodes=st.one_of(small, int32), gpus_per_node=st.one_of(small, int32),
                         num_groups=st.one_of(small, int32))  # fmt: skip
    resume = st.builds(pb.ResumePoint, tensor=text, offset=st.integers(0, 2**64 - 1))
    fetch = st.builds(
        pb.FetchShardRequest,
        shard=shard_specs(),
        names=st.lists(text, max_size=5),
        manifest_id=st.one_of(st.just(""), text),
        resume_from=st.one_of(st.none(), resume),
        transport=st.integers(0, 3),
    )
    return st.one_of(
        st.tuples(st.just("weights"), st.just("ListModels"), st.just(pb.ListModelsRequest())),
        st.tuples(st.just("weights"), st.just("GetManifest"), st.builds(pb.GetManifestRequest, shard=shard_specs())),
        st.tuples(st.just("weights"), st.just("FetchShard"), fetch),
        st.tuples(st.just("weights"), st.just("FetchFiles"), st.builds(
            pb.FetchFilesRequest, model=model, revision=st.one_of(st.just(""), text),
            patterns=st.lists(text, max_size=5))),
        st.tuples(st.just("weights"), st.just("Prefetch"), st.builds(
            pb.PrefetchRequest, model=model, world_size=st.one_of(small, int32),
            ranks=st.lists(st.one_of(small, int32), max_size=8), layout=st.integers(0, 3))),
        st.tuples(st.just("weights"), st.just("Evict"), st.builds(pb.EvictRequest, model=model)),
        st.tuples(st.just("control"), st.just("ReportExpertLoad"), st.builds(
            pb.ReportExpertLoadRequest, model=model, load=load,
            ep_rank=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
            sequence=st.one_of(st.none(), st.integers(0, 2**64 - 1)))),
        st.tuples(st.just("control"), st.just("Rebalance"), st.builds(
            pb.RebalanceRequest, model=model,
            policy=st.one_of(st.sampled_from(["", "greedy", "hierarchical", "nope"]), text),
            num_replicas=st.one_of(small, int32), topology=st.one_of(st.none(), topology))),
        st.tuples(st.just("control"), st.just("GetRebalance"), st.builds(
            pb.GetRebalanceRequest, job_id=text,
            wait_seconds=st.one_of(st.just(0.0), st.floats(-1, 0.2), st.just(float("nan"))))),
        st.tuples(st.just("control"), st.just("WatchExpertMapping"), st.builds(
            pb.WatchExpertMappingRequest, model=model, after_version=st.integers(0, 2**64 - 1))),
    )  # fmt: skip


def call(server: dict[str, Any], service: str, method: str, request: Any) -> grpc.StatusCode:
    """Send one request; read a stream for at most a few messages; return the status."""
    stub = getattr(server[service], method)
    try:
        if method in ("FetchShard", "FetchFiles", "WatchExpertMapping"):
            stream = stub(request, timeout=1.0 if method == "WatchExpertMapping" else 10)
            for count, _ in enumerate(stream):
                if count >= 64:
                    stream.cancel()
                    return grpc.StatusCode.CANCELLED
        else:
            stub(request, timeout=10)
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(request=requests())
def test_random_requests_get_proper_statuses(capped_server: dict[str, Any], request: tuple[str, str, Any]) -> None:
    service, method, message = request
    code = call(capped_server, service, method, message)
    assert code not in BAD, f"{method} answered {code}: {message!r:.300}\n{capped_server['log'].read_text()[-2000:]}"
    assert capped_server["proc"].poll() is None, f"the server died ({capped_server['how']})"


def test_the_server_survives_within_its_cap_and_serves_bit_identically(capped_server: dict[str, Any]) -> None:
    """Runs after the random requests (pytest keeps file order): the same process, still whole."""
    assert capped_server["proc"].poll() is None, f"the server died ({capped_server['how']})"
    print(f"the server ran under {capped_server['how']}")  # shown with -s, and in the reliability record
    with WeightClient(capped_server["address"], timeout=30) as client:
        state = client.fetch_state_dict("org/tiny-llama")
    assert_bit_identical(state, load_checkpoint(capped_server["root"] / "org" / "tiny-llama"))
    peak = peak_usage(capped_server["group"])
    assert peak is None or peak < LIMIT, f"peak {peak} under {capped_server['how']}"
    log = capped_server["log"].read_text()
    assert "Traceback" not in log, log[-3000:]
