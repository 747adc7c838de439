"""Where the server listens: the start-up line names each address, and the data port says where
the control methods went under --control-listen."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.conftest import ServeFn
from weightserve.client import WeightClient
from weightserve.server.lifecycle import bound_address
from weightserve.v1 import weightserve_pb2 as pb
from weightserve.v1 import weightserve_pb2_grpc as pb_grpc


@pytest.mark.parametrize(
    ("address", "port", "shown"),
    [
        ("127.0.0.1:0", 41234, "127.0.0.1:41234"),
        ("[::1]:50051", 50051, "[::1]:50051"),
        ("unix:/run/weightserve/ws.sock", 1, "unix:/run/weightserve/ws.sock"),
        ("unix:relative.sock", 1, "unix:relative.sock"),
        ("unix:///abs/ws.sock", 1, "unix:///abs/ws.sock"),
        ("unix-abstract:weightserve", 1, "unix-abstract:weightserve"),
    ],
)
def test_the_start_up_line_names_a_unix_socket_by_its_path(address: str, port: int, shown: str) -> None:
    assert bound_address(address, port) == shown


def test_the_data_port_answers_every_control_method_with_where_it_is_served(model_root: Path, serve: ServeFn) -> None:
    server = serve(model_root, control_listen="127.0.0.1:0", metrics_listen="off")
    with grpc.insecure_channel(server.address) as data:
        weights, control = pb_grpc.WeightServiceStub(data), pb_grpc.ControlServiceStub(data)
        calls: dict[str, Callable[[], Any]] = {
            "Prefetch": lambda: weights.Prefetch(pb.PrefetchRequest(model="org/tiny-llama")),
            "Evict": lambda: weights.Evict(pb.EvictRequest(model="org/tiny-llama")),
            "ReportExpertLoad": lambda: control.ReportExpertLoad(pb.ReportExpertLoadRequest(model="m")),
            "Rebalance": lambda: control.Rebalance(pb.RebalanceRequest(model="m")),
            "GetRebalance": lambda: control.GetRebalance(pb.GetRebalanceRequest(job_id="x")),
            "WatchExpertMapping": lambda: list(
                control.WatchExpertMapping(pb.WatchExpertMappingRequest(model="m"), timeout=5)
            ),
        }
        every = {m.name for m in pb.DESCRIPTOR.services_by_name["ControlService"].methods} | {"Prefetch", "Evict"}
        assert set(calls) == every
        for method, call in calls.items():
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED, method
            assert info.value.details() == f"{method} is served on the control address (--control-listen), not here"


@pytest.mark.fault("bad or unknown server setting")
def test_a_second_server_on_a_live_unix_socket_is_refused_and_the_first_keeps_serving(
    model_root: Path, serve: ServeFn, tmp_path: Path
) -> None:
    address = f"unix:{tmp_path / 'ws.sock'}"
    first = serve(model_root, listen=address, metrics_listen="off")
    with pytest.raises(OSError, match="another server is listening on"):
        serve(model_root, listen=address, metrics_listen="off")
    with WeightClient(first.address) as client:  # both socket files are still the first server's
        assert client.get_manifest("org/tiny-llama").tensors
        client.fetch_state_dict("org/tiny-llama", transport="shm")


def test_a_dead_servers_socket_file_is_replaced(model_root: Path, serve: ServeFn, tmp_path: Path) -> None:
    stale = tmp_path / "ws.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(stale))  # bound, never listening: connecting is refused, as after a crash
    server = serve(model_root, listen=f"unix:{stale}", metrics_listen="off")
    with WeightClient(server.address) as client:
        assert client.get_manifest("org/tiny-llama").tensors
