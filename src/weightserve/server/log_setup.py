"""Logging of a serving process: one line per record, as text or as JSON objects.

Configured once, by the process entry (`weightserve serve`), never on import. JSON lines
carry the record's standard fields plus the structured fields a record was given
(`extra=`): an access line's method, model, shard, bytes, seconds, code, peer and
request id are separate keys a log pipeline can index.

A text line is one line whatever its arguments hold: a line break in a message (a
caller's value that slipped past every check) is written as an escape, so nobody can
forge a line; only a traceback, which the server writes, spans lines. JSON escapes
them by itself (`json.dumps` writes every control and non-ASCII character as `\\uXXXX`).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from weightserve.server.log_text import escape_text

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, with line breaks and other invisible characters in the message escaped."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_text(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the extras, and an exception if any."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(level: str, fmt: str = "text") -> None:
    """Send every record at `level` and above to stderr, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
