"""ServerConfig.from_env: WEIGHTSERVE_* variables, overrides, and refusals."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from weightserve.config import ServerConfig, parse_size


def test_no_variables_gives_the_defaults() -> None:
    assert ServerConfig.from_env({}) == ServerConfig()


def test_variables_are_parsed() -> None:
    env = {
        "WEIGHTSERVE_MODEL_ROOTS": os.pathsep.join(["/models/a", "", "/models/b"]),
        "WEIGHTSERVE_LISTEN": "0.0.0.0:6000",
        "WEIGHTSERVE_CHUNK_BYTES": "65536",
        "WEIGHTSERVE_READ_THREADS": "3",
        "WEIGHTSERVE_PREFETCH_DEPTH": "4",
        "WEIGHTSERVE_CACHE_MEMORY": "2GiB",
        "WEIGHTSERVE_DISK_CACHE_BYTES": "1.5G",
        "WEIGHTSERVE_DISK_CACHE_DIR": "/var/cache/ws",
        "WEIGHTSERVE_ALLOW_SOURCE": "hf://*,,s3://bucket/prefix/*",
        "WEIGHTSERVE_SHARDING_RULES": "/etc/ws/rules.toml",
        "WEIGHTSERVE_GRACE_SECONDS": "2.5",
        "WEIGHTSERVE_KEEPALIVE_SECONDS": "12",
        "WEIGHTSERVE_KEEPALIVE_TIMEOUT_SECONDS": "0.5",
        "WEIGHTSERVE_LOG_LEVEL": "DEBUG",
    }
    config = ServerConfig.from_env(env)
    assert config.model_roots == (Path("/models/a"), Path("/models/b"))
    assert config.listen == "0.0.0.0:6000"
    assert (config.chunk_bytes, config.read_threads, config.prefetch_depth) == (65536, 3, 4)
    assert (config.cache_memory, config.disk_cache_bytes) == (2 * 2**30, 1_500_000_000)
    assert config.disk_cache_dir == Path("/var/cache/ws")
    assert config.allow_source == ("hf://*", "s3://bucket/prefix/*")
    assert config.sharding_rules == Path("/etc/ws/rules.toml")
    assert (config.grace_seconds, config.keepalive_seconds, config.keepalive_timeout_seconds) == (
        2.5,
        12.0,
        0.5,
    )
    assert isinstance(config.chunk_bytes, int) and isinstance(config.grace_seconds, float)
    assert config.log_level == "DEBUG"


def test_unix_listen_address() -> None:
    assert ServerConfig.from_env({"WEIGHTSERVE_LISTEN": "unix:/run/ws.sock"}).listen == "unix:/run/ws.sock"


def test_other_variables_are_ignored() -> None:
    env = {"CHUNK_BYTES": "1", "weightserve_chunk_bytes": "1", "PATH": "/bin", "WEIGHTSERVE_DEMO_DIR": "/d"}
    assert ServerConfig.from_env(env) == ServerConfig()


@pytest.mark.fault("bad or unknown server setting")
@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("WEIGHTSERVE_READ_AHEAD", "did you mean WEIGHTSERVE_READ_THREADS?"),
        ("WEIGHTSERVE_CHUNK_BYTE", "did you mean WEIGHTSERVE_CHUNK_BYTES?"),
        ("WEIGHTSERVE_MODEL_ROOT", "did you mean WEIGHTSERVE_MODEL_ROOTS?"),
        ("WEIGHTSERVE_NOT_A_FIELD", "settings are WEIGHTSERVE_MODEL_ROOTS, "),
    ],
)
def test_an_unknown_variable_stops_with_the_closest_setting(name: str, hint: str) -> None:
    with pytest.raises(ValueError) as info:
        ServerConfig.from_env({name: "2"})
    message = str(info.value)
    assert message.startswith(f"unknown setting {name}") and hint in message and "\n" not in message


def test_kubernetes_service_links_and_documented_variables_are_not_unknown() -> None:
    # what the kubelet injects into every pod of a namespace with a Service named `weightserve`
    env = {
        "WEIGHTSERVE_SERVICE_HOST": "10.0.0.7",
        "WEIGHTSERVE_SERVICE_PORT": "50051",
        "WEIGHTSERVE_SERVICE_PORT_GRPC": "50051",
        "WEIGHTSERVE_SERVICE_PORT_METRICS": "9400",
        "WEIGHTSERVE_PORT": "tcp://10.0.0.7:50051",
        "WEIGHTSERVE_PORT_50051_TCP": "tcp://10.0.0.7:50051",
        "WEIGHTSERVE_PORT_50051_TCP_PROTO": "tcp",
        "WEIGHTSERVE_PORT_50051_TCP_PORT": "50051",
        "WEIGHTSERVE_PORT_50051_TCP_ADDR": "10.0.0.7",
        "WEIGHTSERVE_DEMO_DIR": "/tmp/demo",
        "WEIGHTSERVE_BENCH_DIR": "/tmp/bench",
    }
    assert ServerConfig.from_env(env) == ServerConfig()


def test_every_setting_has_a_variable_and_a_bool_parses() -> None:
    assert ServerConfig.from_env({"WEIGHTSERVE_IN_PLACE_MESSAGES": "false"}).in_place_messages is False
    with pytest.raises(ValueError, match=r"WEIGHTSERVE_IN_PLACE_MESSAGES='maybe': 'maybe' is not a boolean"):
        ServerConfig.from_env({"WEIGHTSERVE_IN_PLACE_MESSAGES": "maybe"})


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEIGHTSERVE_READ_THREADS", "5")
    assert ServerConfig.from_env().read_threads == 5


def test_overrides_win_and_none_means_unset() -> None:
    env = {
        "WEIGHTSERVE_CHUNK_BYTES": "8192",
        "WEIGHTSERVE_LISTEN": "127.0.0.1:1",
        "WEIGHTSERVE_READ_THREADS": "2",
    }
    config = ServerConfig.from_env(env, chunk_bytes=16384, listen=None, model_roots=(Path("/m"),))
    assert config.chunk_bytes == 16384
    assert config.listen == "127.0.0.1:1"
    assert config.read_threads == 2
    assert config.model_roots == (Path("/m"),)


def test_overrides_are_validated_too() -> None:
    with pytest.raises(ValueError, match=r"chunk_bytes 1 must be within"):
        ServerConfig.from_env({}, chunk_bytes=1)


def test_an_override_wins_over_an_out_of_range_variable() -> None:
    # CLI flags override the environment: a flag that replaces a bad variable is what
    # the server runs with, so the variable's value must not be judged on its own.
    config = ServerConfig.from_env({"WEIGHTSERVE_READ_THREADS": "0"}, read_threads=4)
    assert config.read_threads == 4


@pytest.mark.fault("bad or unknown server setting")
@pytest.mark.parametrize(
    ("name", "value", "pattern"),
    [
        ("CHUNK_BYTES", "lots", r"invalid literal"),
        ("CHUNK_BYTES", "4.5", r"invalid literal"),
        ("CHUNK_BYTES", "", r"invalid literal"),
        ("CHUNK_BYTES", "4095", r"chunk_bytes 4095 must be within"),
        ("CHUNK_BYTES", str(4 * 1024 * 1024), r"chunk_bytes 4194304 must be within"),
        ("READ_THREADS", "0", r"read_threads 0 must be >= 1"),
        ("PREFETCH_DEPTH", "0", r"prefetch_depth 0 must be >= 1"),
        ("CACHE_MEMORY", "lots", r"'lots' is not a size"),
        ("CACHE_MEMORY", "-1GiB", r"is not a size"),
        ("DISK_CACHE_BYTES", "3 parsecs", r"is not a size"),
        ("GRACE_SECONDS", "-1", r"grace_seconds"),
        ("GRACE_SECONDS", "soon", r"could not convert"),
        ("KEEPALIVE_SECONDS", "0", r"keepalive"),
        ("KEEPALIVE_TIMEOUT_SECONDS", "-3", r"keepalive"),
        ("LISTEN", "localhost", r"must be HOST:PORT or unix:PATH"),
    ],
)
def test_bad_values_raise_value_error(name: str, value: str, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        ServerConfig.from_env({f"WEIGHTSERVE_{name}": value})


@pytest.mark.fault("bad or unknown server setting")
@pytest.mark.parametrize("name", ["GRACE_SECONDS", "KEEPALIVE_SECONDS", "KEEPALIVE_TIMEOUT_SECONDS"])
def test_nan_durations_are_refused(name: str) -> None:
    # NaN compares false with everything, so `x < 0` alone lets it through; a NaN
    # keepalive then fails later, in int(nan * 1000), when the server is built.
    with pytest.raises(ValueError):
        ServerConfig.from_env({f"WEIGHTSERVE_{name}": "nan"})


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("4096", 4096),
        ("20GiB", 20 * 2**30),
        ("512MB", 512 * 10**6),
        ("1.5G", 1_500_000_000),
        ("2 kib", 2048),
        (" 7B ", 7),
        ("1TiB", 2**40),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.fault("bad or unknown server setting")
@pytest.mark.parametrize("text", ["", "GiB", "1e9", "-5", "5 GiBs", "five", "1.2.3G"])
def test_parse_size_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a size"):
        parse_size(text)


def test_config_is_frozen() -> None:
    config = ServerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.chunk_bytes = 8192  # type: ignore[misc]
