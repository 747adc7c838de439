"""The client's TLS and token options (client/security.py), without a server."""

from __future__ import annotations

from pathlib import Path

import pytest

from weightserve.client.call_metadata import CallMetadata
from weightserve.client.security import is_local, security_from


@pytest.mark.parametrize(
    ("target", "local"),
    [
        ("localhost:50051", True),
        ("127.0.0.1:50051", True),
        ("127.3.4.5:1", True),
        ("[::1]:50051", True),
        ("dns:///localhost:50051", True),
        ("unix:/run/weightserve.sock", True),
        ("unix-abstract:weightserve", True),
        ("10.0.0.5:50051", False),
        ("weights.svc.cluster.local:50051", False),
        ("[2001:db8::1]:50051", False),
        ("localhost.evil.com:50051", False),
    ],
)
def test_loopback_and_unix_targets_are_local(target: str, local: bool) -> None:
    assert is_local(target) is local


@pytest.mark.fault("token that would travel in plaintext")
def test_a_token_is_never_sent_in_plaintext_to_another_host_unless_allowed() -> None:
    with pytest.raises(ValueError, match=r"refusing to send a token in plaintext to 10\.0\.0\.5:50051"):
        security_from("10.0.0.5:50051", token="t", env={})
    assert security_from("10.0.0.5:50051", token="t", allow_insecure_token=True, env={}).token == "t"
    assert security_from("10.0.0.5:50051", token="t", tls=True, env={}).tls
    assert security_from("127.0.0.1:50051", token="t", env={}).metadata() == (("authorization", "Bearer t"),)
    with pytest.raises(ValueError, match="line breaks"):
        security_from("127.0.0.1:1", token="a\nb", env={})


def test_the_environment_gives_the_defaults_and_arguments_win(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"CA PEM")
    env = {"WEIGHTSERVE_TOKEN": "from-env", "WEIGHTSERVE_TLS_CA": str(ca)}
    security = security_from("weights:50051", env=env)
    assert (security.token, security.tls, security.root_certificates) == ("from-env", True, b"CA PEM")
    assert security_from("weights:50051", token="given", root_certificates=b"X", env=env).token == "given"
    plain = security_from("weights:50051", env={})
    assert (plain.token, plain.tls, plain.credentials(), plain.metadata()) == (None, False, None, ())


def test_a_certificate_needs_its_key_and_files_must_be_readable(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs its private key"):
        security_from("weights:1", certificate_chain=b"cert", env={})
    with pytest.raises(ValueError, match=r"cannot read the root certificates at .*missing.pem .*WEIGHTSERVE_TLS_CA"):
        security_from("weights:1", root_certificates=tmp_path / "missing.pem", env={})


def test_call_metadata_adds_the_pid_only_over_unix_sockets() -> None:
    assert not CallMetadata((), unix=False)
    token_only = CallMetadata((("authorization", "Bearer t"),), unix=False)
    assert token_only.pairs() == (("authorization", "Bearer t"),)
    keys = [key for key, _ in CallMetadata((("authorization", "Bearer t"),), unix=True).pairs()]
    assert keys == ["authorization", "x-weightserve-pid"]
