"""Settings from a TOML file (`weightserve serve --config`), and settings written back as TOML.

The file's keys are the setting names (ServerConfig's fields), at the top level:

    model_roots = ["/models"]
    listen = "0.0.0.0:50051"
    cache_memory = "20GiB"

This module only reads and writes the file; config.parse_setting turns each value into
the setting, with the same parsers as the WEIGHTSERVE_* variables. Stdlib only (tomli
is the stdlib's tomllib, installed on Python 3.10).
"""

from __future__ import annotations

import difflib
import math
import sys
from collections.abc import Collection, Mapping
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

SECRET_WORDS = ("token", "key", "secret")
"""A setting whose name holds one of these is masked when settings are printed."""

MASK = "***"


def load_settings(path: Path, known: Collection[str]) -> dict[str, object]:
    """The settings a TOML file sets, by name, as TOML values (parse them with config.parse_setting).

    Args:
        path: the file.
        known: every setting name; any other key is refused.

    Raises:
        ValueError: the file cannot be read or is not TOML, or a key is no setting (the
            message names the closest one) or holds a table.
    """
    try:
        data: dict[str, object] = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"config file {path}: cannot read it ({e.strerror or e})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {path}: not TOML ({e})") from None
    for key, value in data.items():
        if isinstance(value, dict):
            raise ValueError(f"config file {path}: {key[:80]} is a table; settings are top-level keys")
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else f"settings are {', '.join(known)}"
            raise ValueError(f"config file {path}: unknown setting {key[:80]!r}; {hint}")
    return data


def is_secret(name: str) -> bool:
    """Whether a setting's value is kept out of printed settings (tokens, keys, secrets)."""
    lowered = name.lower()
    return any(word in lowered for word in SECRET_WORDS)


def masked(values: Mapping[str, object], plain: Collection[str] = ()) -> dict[str, object]:
    """`values` with every secret setting that is set (not empty) replaced by MASK.

    `plain` names settings that only point at a secret (the path of a key or token file):
    they are printed, since an operator needs to see which file is in use.
    """
    return {
        name: MASK if is_secret(name) and name not in plain and _is_set(value) else value
        for name, value in values.items()
    }


def _is_set(value: object) -> bool:
    return value is not None and value != "" and not (isinstance(value, (list, tuple)) and not value)


def dump_settings(values: Mapping[str, object], plain: Collection[str] = ()) -> str:
    """TOML text of `values` (strings, numbers, booleans and lists of them), in their order, secrets masked.

    Raises:
        TypeError: a value TOML cannot hold as written here (a table, None).
    """
    return "".join(f"{name} = {toml_value(value)}\n" for name, value in masked(values, plain).items())


def toml_value(value: object) -> str:
    """One TOML value: a basic string, integer, float, boolean or array of those.

    Raises:
        TypeError: anything else.
    """
    if isinstance(value, bool):  # before int: a bool is an int
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML value for {value!r}")


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'
