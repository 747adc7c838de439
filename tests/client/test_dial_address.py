"""Server addresses a client is given are checked before anything dials.

Unchecked, "" reached gRPC core (a C++ source line on stderr, every call UNKNOWN),
"localhost" dialled port 443, and a port above 65535 read "connection refused".
"""

from __future__ import annotations

import pytest

from weightserve.addresses import dial_address
from weightserve.cli import main
from weightserve.client import AsyncWeightClient, WeightClient
from weightserve.client.routing import Target
from weightserve.errors import InvalidRequestError

BAD = {
    "": "empty",
    "localhost": "HOST:PORT",
    "127.0.0.1:99999": "outside",
    "127.0.0.1:-1": "HOST:PORT",
    "127.0.0.1:0": "port 0",
    ":50051": "host",
    "unix:": "socket",
    "[::1]:70000": "outside",
}
GOOD = ["127.0.0.1:50051", "[::1]:50051", "unix:/run/ws.sock", "/run/ws.sock", "unix-abstract:ws", "ipv4:10.0.0.1:1"]


@pytest.mark.parametrize("address", GOOD)
def test_dialable_addresses_pass_as_written(address: str) -> None:
    assert dial_address(address) == address


@pytest.mark.parametrize(("address", "says"), BAD.items())
def test_undialable_addresses_are_refused_by_both_clients(address: str, says: str) -> None:
    with pytest.raises(InvalidRequestError, match=says):
        WeightClient(address)
    with pytest.raises(InvalidRequestError, match=says):
        AsyncWeightClient(address)


@pytest.mark.parametrize(
    ("address", "says"),
    [
        ("a:1,b:99999", "'b:99999'"),
        ("a:1,localhost", "'localhost'"),
        ("dns:///svc", "port"),
        ("dns:///:5", "host"),
        ("dns:///svc:0", "host and port"),
        ("dns:///svc:65536", "outside"),
    ],
)
def test_fleet_addresses_are_checked_each(address: str, says: str) -> None:
    with pytest.raises(InvalidRequestError, match=says):
        Target.parse(address)
    with pytest.raises(InvalidRequestError, match=says):
        WeightClient(address)


@pytest.mark.parametrize("address", ["127.0.0.1:99999", "", "a:1,b:99999", "dns:///svc"])
def test_cli_refuses_a_bad_server_in_one_line_exit_2(address: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", "--server", address, "--timeout", "1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
