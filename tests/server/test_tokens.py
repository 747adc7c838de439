"""The token file: parsing, model globs, scopes and reloading (server/tokens.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from weightserve.server.tokens import ANONYMOUS, TokenFile, compile_glob, parse_tokens, token_digest

WORKERS = token_digest("s3cret-workers")
CONTROLLER = token_digest("s3cret-controller")


def entry(name: str, digest: str, *lines: str) -> str:
    return "\n".join(["[[tokens]]", f'name = "{name}"', f'sha256 = "{digest}"', *lines, ""])


@pytest.mark.parametrize(
    ("glob", "matches", "misses"),
    [
        ("org/*", ["org/m", "org/llama-3"], ["org/sub/m", "org", "other/m"]),
        ("org/**", ["org/m", "org/sub/m"], ["org", "orgx/m"]),
        (
            "hf://meta-llama/*",
            ["hf://meta-llama/Llama-3", "hf://meta-llama/L@main"],
            ["hf://meta-llama/a/b", "meta-llama/L"],
        ),
        ("s3://bucket/models/*", ["s3://bucket/models/m"], ["s3://bucket/other/m"]),
        ("org/m?", ["org/m1"], ["org/m", "org/m12", "org/m/"]),
        ("a.b/[x]", ["a.b/[x]"], ["aXb/[x]", "a.b/x"]),
        ("**", ["anything/at/all", "m"], []),
    ],
)
def test_a_glob_star_stays_within_a_segment(glob: str, matches: list[str], misses: list[str]) -> None:
    pattern = compile_glob(glob)
    assert [m for m in matches if not pattern.fullmatch(m)] == []
    assert [m for m in misses if pattern.fullmatch(m)] == []


def test_tokens_parse_with_their_scopes_and_limits() -> None:
    text = entry("workers", WORKERS, 'models = ["org/*"]', "max_streams = 4", 'bytes_per_second = "2MiB"')
    text += entry("controller", CONTROLLER.upper(), 'models = ["**"]', "control = true", "cache = true")
    tokens = parse_tokens(text, "tokens.toml")
    workers, controller = tokens[WORKERS], tokens[CONTROLLER]
    assert (workers.name, workers.max_streams, workers.bytes_per_second) == ("workers", 4, 2 * 2**20)
    assert workers.may_read("org/m") and not workers.may_read("secret/m")
    assert workers.may("") and not workers.may("control") and not workers.may("cache")
    assert controller.may("control") and controller.may("cache") and not controller.may("publish")
    assert controller.may_read("any/model")


def test_an_empty_file_has_no_tokens_and_a_token_without_models_reads_nothing() -> None:
    assert parse_tokens("", "t.toml") == {}
    (token,) = parse_tokens(entry("nothing", WORKERS), "t.toml").values()
    assert not token.may_read("org/m")


@pytest.mark.fault("bad or unknown server setting")
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[tokens]\n", "not TOML"),
        ("[other]\n", "unknown table 'other'"),
        ('tokens = "x"\n', "must be a list"),
        (entry("w", WORKERS, "contol = true"), "unknown key 'contol'; did you mean control?"),
        (entry("w w", WORKERS), "name must be"),
        (entry("w", "abc"), "token 1 (w): sha256 must be"),
        (entry("w", WORKERS, 'models = "org/*"'), "models must be a list"),
        (entry("w", WORKERS, 'models = [""]'), "models must be a list"),
        (entry("w", WORKERS, 'control = "yes"'), "control must be true or false"),
        (entry("w", WORKERS, "max_streams = -1"), "max_streams must be"),
        (entry("w", WORKERS, "max_streams = true"), "max_streams must be"),
        (entry("w", WORKERS, 'bytes_per_second = "fast"'), "bytes_per_second: 'fast' is not a size"),
        (entry("w", WORKERS, "bytes_per_second = -5"), "bytes_per_second must be"),
        (entry("w", WORKERS) + entry("w", CONTROLLER), "token name 'w' is used twice"),
        (entry("a", WORKERS) + entry("b", WORKERS), "tokens 'a' and 'b' have the same sha256"),
    ],
)
def test_a_bad_token_file_is_refused_naming_the_problem(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=r"^tokens\.toml: ") as info:
        parse_tokens(text, "tokens.toml")
    assert message in str(info.value)
    assert "s3cret" not in str(info.value)


def test_the_anonymous_caller_may_do_everything() -> None:
    assert ANONYMOUS.may_read("any/model/at/all") and all(ANONYMOUS.may(s) for s in ("control", "cache", "publish"))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_file_is_read_again_when_it_changes_and_a_bad_one_keeps_the_tokens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(entry("workers", WORKERS, 'models = ["org/*"]'))
    clock = Clock()
    tokens = TokenFile(path, clock)
    assert tokens.lookup("s3cret-workers").name == "workers"  # type: ignore[union-attr]
    assert tokens.lookup("s3cret-controller") is None

    path.write_text(entry("controller", CONTROLLER, "control = true"))
    assert tokens.lookup("s3cret-workers") is not None  # looked at once a second, not per call
    clock.now = 1.5
    assert tokens.lookup("s3cret-workers") is None
    assert tokens.lookup("s3cret-controller").control  # type: ignore[union-attr]

    path.write_text("[[tokens]\nbroken")
    clock.now = 3.0
    with caplog.at_level(logging.ERROR):
        assert tokens.lookup("s3cret-controller") is not None
    assert "keeping the 1 in force" in caplog.text and tokens.rejected == 1
    assert "s3cret" not in caplog.text

    path.unlink()
    assert not tokens.reload()  # SIGHUP with the file gone: the tokens stay
    assert tokens.lookup("s3cret-controller") is not None


def test_a_missing_or_bad_file_at_start_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--auth-tokens .*missing.toml: cannot read it"):
        TokenFile(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text(entry("w", "nothex"))
    with pytest.raises(ValueError, match="sha256 must be"):
        TokenFile(tmp_path / "bad.toml")


def test_the_token_command_prints_a_token_and_an_entry_that_parses(capsys: pytest.CaptureFixture[str]) -> None:
    from weightserve.cli import main

    args = ["token", "--name", "ctl", "--models", "org/*", 'we"ird/**', "--control", "--bytes-per-second", "1GiB"]
    assert main(args) == 0
    secret, entry_text = capsys.readouterr().out.split("\n", 1)
    assert len(secret) >= 40
    (token,) = parse_tokens(entry_text, "printed").values()
    assert token.sha256 == token_digest(secret) and token.name == "ctl"
    assert token.models == ("org/*", 'we"ird/**') and token.control and not token.cache
    assert token.bytes_per_second == 2**30
    assert main(["token", "--name", "a b"]) == 2
    assert "--name 'a b' must be" in capsys.readouterr().err
    assert main(["token", "--name", "x"]) == 0
    first = capsys.readouterr().out.split("\n", 1)[0]
    assert main(["token", "--name", "x"]) == 0
    assert capsys.readouterr().out.split("\n", 1)[0] != first  # random each time


@pytest.mark.fault("bad or unknown server setting", cases=3)
def test_a_file_reloaded_empty_or_without_tokens_keeps_the_tokens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(entry("workers", WORKERS, 'models = ["org/*"]'))
    tokens = TokenFile(path)
    for text in ("", "\n# rotated soon\n", "tokens = []\n"):  # `> tokens.toml`, an editor's truncation
        path.write_text(text)
        with caplog.at_level(logging.ERROR):
            assert not tokens.reload()
        assert tokens.lookup("s3cret-workers") is not None, text
    assert tokens.rejected == 3 and caplog.text.count("holds no [[tokens]]") == 3
    path.write_text(entry("controller", CONTROLLER))
    assert tokens.reload() and tokens.lookup("s3cret-workers") is None  # a real revocation still takes

    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert TokenFile(empty).tokens == {}  # at start an empty file is no tokens: every call is refused
