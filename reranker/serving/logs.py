"""Logging set-up: human text or one JSON object per line, chosen by the `log_format` setting.

Structured fields travel in `extra={"fields": {...}}`; both formatters render them (JSON as keys,
text as ` key=value`). Raw user ids and texts are never passed as fields (see observability.py).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from reranker.config import ObservabilitySettings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


class JsonFormatter(logging.Formatter):
    """{"ts": RFC 3339 UTC, "level", "logger", "message", ...fields, "exception"?}"""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        out: dict[str, Any] = {
            "ts": ts,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _fields(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if not fields:
            return line
        first, sep, rest = line.partition("\n")  # keep a traceback after the fields
        extra = " ".join(f"{k}={v}" for k, v in fields.items() if v not in ("", None))
        return f"{first} {extra}{sep}{rest}"


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is when a record comes (not the one at set-up): a caller that
    swapped stderr for a while (a test's capture, since closed) leaves no handler on a closed stream."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def configure_logging(settings: ObservabilitySettings, stream: TextIO | None = None) -> None:
    """Replace the root handlers with one stderr handler in the configured format and level."""
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    logging.captureWarnings(True)  # Python warnings become log records in the same format
