"""The PromQL expressions the deploy files hold, and the metric names and labels they select.

Names are read with regular expressions, which is enough for the expressions we write:
string literals are blanked first, then `{...}` matchers, `[...]` ranges and the label
lists of `by`/`without`/`on`/`ignoring`/`group_*` are set aside; what is left that is an
identifier not followed by `(` and not a keyword is a metric name.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}

KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"inf", "nan", "start", "end"}
)
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
SELECTOR = re.compile(r"(?<![\w:.])([a-zA-Z_:][\w:]*)?\s*\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
SET_ASIDE = re.compile(r"\{[^}]*\}|\[[^\]]*\]|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
NAME = re.compile(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()")
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")
LABEL_VALUES = re.compile(r"^\s*label_values\((?:(.*),)?\s*(\w+)\s*\)\s*$", re.DOTALL)


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """`expr` with Grafana's `$name`, `${name}` and `[[name]]` replaced (built-ins included).

    Raises:
        KeyError: a variable that neither `variables` nor the built-ins define.
    """
    values = {**GRAFANA_BUILTINS, **variables}

    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name not in values:
            raise KeyError(f"unknown Grafana variable ${name} in: {expr}")
        return values[name]

    return VARIABLE.sub(value, expr)


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # rows hold their panels when collapsed


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every panel target, and the series selector of every label_values() variable."""
    found = [
        (f"panel {panel['title']!r} target {target.get('refId', '?')}", target["expr"])
        for panel in _panels(dashboard.get("panels", []))
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]
        query = query.get("query", "") if isinstance(query, dict) else query
        match = LABEL_VALUES.match(query)
        assert match, f"variable {variable['name']}: only label_values(...) queries are checked; got {query!r}"
        if match[1]:
            found.append((f"variable {variable['name']!r}", match[1]))
    return found


def rule_exprs(rules: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every alerting and recording rule of a Prometheus rules file."""
    return [
        (f"rule {rule.get('alert') or rule.get('record')!r}", rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]


def selected(expr: str) -> dict[str, set[str]]:
    """Every metric name `expr` selects, with the label names its matchers use."""
    text = STRING.sub('""', expr)
    names: dict[str, set[str]] = {}
    for match in SELECTOR.finditer(text):
        if match[1] and match[1] not in KEYWORDS:
            names.setdefault(match[1], set()).update(MATCHER_LABEL.findall(match[2]))
    for name in NAME.findall(SET_ASIDE.sub(" ", text)):
        if name not in KEYWORDS:
            names.setdefault(name, set())
    return names
