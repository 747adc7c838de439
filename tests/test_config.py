"""ServerConfig.from_env: WEIGHTSERVE_* variables, a config file, overrides, and refusals; the TOML file itself."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest

from weightserve.config import FILE_SETTINGS, OTHER_VARIABLES, ServerConfig, parse_setting, parse_size, setting_names
from weightserve.config_file import MASK, dump_settings, is_secret, load_settings, masked

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


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
        ("CHUNK_BYTES", "lots", r"'lots' is not a size"),
        ("CHUNK_BYTES", "4.5", r"chunk_bytes 4 must be within"),
        ("CHUNK_BYTES", "", r"is not a size"),
        ("READ_THREADS", "two", r"WEIGHTSERVE_READ_THREADS='two': 'two' is not a whole number"),
        ("LOG_LEVEL", "loud", r"log_level 'loud' must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        ("LOADER", "mmap", r"loader 'mmap' must be one of safetensors, fastsafetensors"),
        ("CHUNK_BYTES", "4095", r"chunk_bytes 4095 must be within"),
        ("CHUNK_BYTES", str(4 * 1024 * 1024), r"chunk_bytes 4194304 must be within"),
        ("READ_THREADS", "0", r"read_threads 0 must be >= 1"),
        ("PREFETCH_DEPTH", "0", r"prefetch_depth 0 must be >= 1"),
        ("CACHE_MEMORY", "lots", r"'lots' is not a size"),
        ("CACHE_MEMORY", "-1GiB", r"is not a size"),
        ("DISK_CACHE_BYTES", "3 parsecs", r"is not a size"),
        ("GRACE_SECONDS", "-1", r"grace_seconds"),
        ("GRACE_SECONDS", "soon", r"'soon' is not a number"),
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


# ------------------------------------------------------------------ sizes, levels, parse_setting


def test_chunk_bytes_takes_size_units_like_every_size() -> None:
    config = ServerConfig.from_env({"WEIGHTSERVE_CHUNK_BYTES": "1MiB", "WEIGHTSERVE_CACHE_MEMORY": "1GiB"})
    assert (config.chunk_bytes, config.cache_memory) == (2**20, 2**30)
    with pytest.raises(ValueError, match=r"chunk_bytes 8388608 must be within \[4096, 4 MiB - 16 KiB\]"):
        ServerConfig.from_env({"WEIGHTSERVE_CHUNK_BYTES": "8MiB"})


@pytest.mark.parametrize("level", ["debug", "Info", "WARNING", "error", "critical"])
def test_log_levels_are_accepted_in_any_case_and_kept_upper(level: str) -> None:
    assert ServerConfig.from_env({"WEIGHTSERVE_LOG_LEVEL": level}).log_level == level.upper()


def test_parse_setting_takes_text_lists_and_toml_values() -> None:
    assert parse_setting("chunk_bytes", "64KiB") == 65536
    assert parse_setting("chunk_bytes", 65536) == 65536
    assert parse_setting("grace_seconds", 3) == 3.0 and isinstance(parse_setting("grace_seconds", 3), float)
    assert parse_setting("grace_seconds", "2.5") == 2.5
    assert parse_setting("in_place_messages", False) is False
    assert parse_setting("in_place_messages", "off") is False
    assert parse_setting("model_roots", ["/a", "", "/b"]) == (Path("/a"), Path("/b"))
    assert parse_setting("model_roots", os.pathsep.join(["/a", "/b"])) == (Path("/a"), Path("/b"))
    assert parse_setting("allow_source", ["hf://*"]) == ("hf://*",)
    assert parse_setting("dummy", ["org/x = /c.json"]) == (("org/x", Path("/c.json")),)
    assert parse_setting("sharding_rules", "") is None
    assert parse_setting("disk_cache_dir", "/cache") == Path("/cache")


@pytest.mark.fault("bad or unknown server setting")
@pytest.mark.parametrize(
    ("name", "value", "pattern"),
    [
        ("read_threads", True, r"True is not a whole number"),
        ("read_threads", 2.5, r"2.5 is not a whole number"),
        ("cache_memory", 1.5, r"1.5 is not a size"),
        ("in_place_messages", 1, r"1 is not true or false"),
        ("listen", 50051, r"50051 is not a string"),
        ("model_roots", [1, 2], r"is not a list of strings"),
        ("dummy", ["no-equals-sign"], r"is not NAME=CONFIG.json"),
        ("chunk_byte", "1", r"no setting 'chunk_byte'"),
    ],
)
def test_parse_setting_refuses_what_does_not_fit(name: str, value: object, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        parse_setting(name, value)


# ------------------------------------------------------------------ file values and precedence


def test_precedence_is_flag_then_variable_then_file_then_default() -> None:
    file_values = {"listen": "0.0.0.0:1", "read_threads": 3, "prefetch_depth": 5, "cache_memory": "1GiB"}
    env = {"WEIGHTSERVE_READ_THREADS": "4", "WEIGHTSERVE_PREFETCH_DEPTH": "6"}
    config = ServerConfig.from_env(env, file_values=file_values, prefetch_depth=7)
    assert config.listen == "0.0.0.0:1"  # file over default
    assert config.read_threads == 4  # variable over file
    assert config.prefetch_depth == 7  # flag over variable and file
    assert config.cache_memory == 2**30  # a file's size takes units, as a variable's does
    assert config.chunk_bytes == ServerConfig().chunk_bytes  # default


def test_a_bad_file_value_names_the_file_and_the_key() -> None:
    with pytest.raises(ValueError) as info:
        ServerConfig.from_env({}, file_values={"read_threads": "many"}, file_name="config file /etc/ws.toml")
    assert str(info.value) == "config file /etc/ws.toml: read_threads = 'many': 'many' is not a whole number"
    # a value that a variable or flag replaces is not judged
    assert (
        ServerConfig.from_env({"WEIGHTSERVE_READ_THREADS": "2"}, file_values={"read_threads": "many"}).read_threads == 2
    )


def test_settings_list_every_field_in_order_and_parse_back() -> None:
    config = ServerConfig(
        model_roots=(Path("/m/a"), Path("/m/b")),
        allow_source=("hf://org/*",),
        dummy=(("org/fake", Path("/c/config.json")),),
        disk_cache_dir=Path("/cache"),
        cache_memory=2**30,
        grace_seconds=2.5,
        in_place_messages=False,
    )
    settings = config.settings()
    assert list(settings) == setting_names()
    assert settings["model_roots"] == ["/m/a", "/m/b"] and settings["dummy"] == ["org/fake=/c/config.json"]
    assert settings["sharding_rules"] == ""  # unset: parses back to None
    assert ServerConfig.from_env({}, file_values=settings) == config


def test_client_and_config_file_variables_are_not_unknown_settings() -> None:
    assert {"WEIGHTSERVE_SERVER", "WEIGHTSERVE_CONFIG"} <= set(OTHER_VARIABLES)
    env = {"WEIGHTSERVE_SERVER": "weights:50051", "WEIGHTSERVE_CONFIG": "/etc/weightserve.toml"}
    assert ServerConfig.from_env(env) == ServerConfig()


# ------------------------------------------------------------------ config_file: reading and writing TOML


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_load_settings_reads_top_level_keys(tmp_path: Path) -> None:
    path = write(tmp_path / "ws.toml", 'model_roots = ["/models"]\ncache_memory = "20GiB"\nread_threads = 3\n')
    values = load_settings(path, setting_names())
    assert values == {"model_roots": ["/models"], "cache_memory": "20GiB", "read_threads": 3}
    config = ServerConfig.from_env({}, file_values=values)
    assert (config.model_roots, config.cache_memory, config.read_threads) == ((Path("/models"),), 20 * 2**30, 3)


@pytest.mark.fault("bad or unknown server setting")
@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("chunk_byte = 65536\n", "unknown setting 'chunk_byte'; did you mean chunk_bytes?"),
        ("model_root = ['/m']\n", "unknown setting 'model_root'; did you mean model_roots?"),
        ("zzz = 1\n", "unknown setting 'zzz'; settings are model_roots, listen, "),
        ("[serve]\nlisten = 'x:1'\n", "serve is a table; settings are top-level keys"),
        ("listen = \n", "not TOML"),
    ],
)
def test_a_bad_file_is_one_line_naming_it(tmp_path: Path, text: str, said: str) -> None:
    path = write(tmp_path / "ws.toml", text)
    with pytest.raises(ValueError) as info:
        load_settings(path, setting_names())
    message = str(info.value)
    assert message.startswith(f"config file {path}: ") and said in message and "\n" not in message


def test_a_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"config file .*none.toml: cannot read it \(No such file or directory\)"):
        load_settings(tmp_path / "none.toml", setting_names())


def test_dumped_settings_are_toml_that_reads_back(tmp_path: Path) -> None:
    values = {
        "text": 'quote " backslash \\ newline \n tab \t bell \x07 del \x7f é',
        "whole": 3,
        "number": 2.5,
        "forever": float("inf"),
        "flag": False,
        "list": ["a", "b c"],
        "empty": [],
    }
    text = dump_settings(values)
    assert list(tomllib.loads(text)) == list(values)
    assert tomllib.loads(text) == values


def test_secrets_are_masked_when_set() -> None:
    # no setting is secret yet; TLS keys and token files will be, by name
    values = {"tls_key": "/etc/tls/key.pem", "auth_token_file": "", "S3_SECRET": ["x"], "listen": "0.0.0.0:1"}
    assert [name for name in values if is_secret(name)] == ["tls_key", "auth_token_file", "S3_SECRET"]
    assert masked(values) == {"tls_key": MASK, "auth_token_file": "", "S3_SECRET": MASK, "listen": "0.0.0.0:1"}
    assert tomllib.loads(dump_settings(values)) == {**values, "tls_key": "***", "S3_SECRET": "***"}
    # the settings with secret-sounding names only point at files: printed, not masked
    assert [name for name in setting_names() if is_secret(name)] == ["tls_key", "auth_tokens"]
    assert set(FILE_SETTINGS) >= {"tls_key", "auth_tokens", "tls_cert", "tls_client_ca"}
    printed = {"tls_key": "/etc/tls/key.pem", "auth_tokens": "/etc/weightserve/tokens.toml"}
    assert masked(printed, plain=FILE_SETTINGS) == printed
