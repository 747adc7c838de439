"""Caller-supplied text made safe for one-line text logs.

Access and audit lines are `key=value` pairs on one line, and the audit trail is the
security record: a value a caller chose (a model name, an error message quoting one)
must never end the line and start a forged one, nor pass for another field. Names with
control characters are refused at the edge (server/request_limits.py); these helpers
are the second line, so a value that slips past any check still stays on its line.
"""

from __future__ import annotations

import unicodedata

_BREAKING = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
"""Categories escaped everywhere: controls (newline, CR, NEL), format characters, lone
surrogates, and line and paragraph separators (U+2028, U+2029)."""
_SIMPLE = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(char: str) -> str:
    simple = _SIMPLE.get(char)
    if simple is not None:
        return simple
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def escape_text(text: str) -> str:
    """`text` with every line-breaking or invisible character written as a backslash escape.

    For free text at the end of a line (an error message); spaces and quotes are kept.
    """
    if text.isprintable():
        return text
    return "".join(_escape_char(c) if unicodedata.category(c) in _BREAKING else c for c in text)


def field(value: str) -> str:
    """`value` as one `key=value` field: as it is when it is plain, else double-quoted and escaped.

    Plain is printable with no space, quote, backslash or `=`, so `model=org/llama` reads as
    before, while `model="a outcome=OK"` cannot pass for a field of its own.
    """
    if value and value.isprintable() and not any(c in value for c in ' "\\='):
        return value
    return '"' + "".join(_escape_char(c) if c in _SIMPLE or not c.isprintable() else c for c in value) + '"'
