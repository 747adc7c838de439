"""The README's settings table and the configuration fields say the same thing."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from weightserve.config import ENV_PREFIX, OTHER_VARIABLES, ServerConfig

README = Path(__file__).resolve().parents[2] / "README.md"
ROW = re.compile(r"^\| `(WEIGHTSERVE_[A-Z0-9_]+)` \|(?P<flag>[^|]*)\|(?P<default>[^|]*)\|(?P<meaning>[^|]*)\|$")


def table_rows() -> dict[str, dict[str, str]]:
    """Variable -> its row's cells, for every row of a WEIGHTSERVE_* table in the README."""
    rows = {}
    for line in README.read_text().splitlines():
        match = ROW.match(line.strip())
        if match:
            rows[match.group(1)] = {k: v.strip() for k, v in match.groupdict().items()}
    return rows


def test_every_setting_has_a_row_and_every_row_a_setting() -> None:
    fields = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(ServerConfig)}
    rows = set(table_rows())
    assert fields - rows == set(), "settings the README's table lacks"
    assert rows - fields == set(), "README rows that name no setting"


def test_documented_defaults_match_the_code() -> None:
    defaults = ServerConfig()
    checked = 0
    for variable, row in table_rows().items():
        value = getattr(defaults, variable.removeprefix(ENV_PREFIX).lower())
        quoted = re.match(r"`([^`]*)`", row["default"])
        if quoted is None:  # "none", "cores, at most 8": prose, not a literal
            continue
        shown = quoted.group(1)
        if isinstance(value, bool):
            assert shown == str(value).lower(), variable
        elif isinstance(value, (int, float)):
            assert float(shown) == value, variable
        else:
            assert shown == str(value), variable
        checked += 1
    assert checked >= 10  # literal defaults are compared, not skipped


def test_flags_named_in_the_table_exist() -> None:
    from weightserve.cli import build_parser

    serve = next(
        action
        for action in build_parser()._actions
        if hasattr(action, "choices") and isinstance(action.choices, dict) and "serve" in action.choices
    ).choices["serve"]
    known = {option for action in serve._actions for option in action.option_strings}
    for variable, row in table_rows().items():
        for flag in re.findall(r"--[a-z0-9-]+", row["flag"]):
            assert flag in known, f"{variable}: README names {flag}, which `weightserve serve` lacks"


def test_other_documented_variables_are_in_the_readme() -> None:
    text = README.read_text()
    for variable in OTHER_VARIABLES:
        assert f"`{variable}`" in text, f"{variable} is allowed by the server but not documented"
