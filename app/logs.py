"""Structured JSON logs, one line each, with redaction applied in one place for every logger."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)
portal_id_var: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "portal_id", default=None
)

# Keys whose values are never written, whatever logged them.
SENSITIVE_KEYS = frozenset(
    {
        "access_token", "refresh_token", "token", "code", "code_verifier", "client_secret",
        "secret", "authorization", "password", "admin_token", "phone", "email", "name",
        "caller", "caller_name", "caller_phone", "caller_email", "summary", "call_summary",
        "transcript", "firstname", "lastname", "mobilephone", "propertyValue", "state",
        "cookie", "set-cookie",
    }
)  # fmt: skip
_PATTERNS = [
    # Bearer credentials and Standard Webhooks secrets.
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1[redacted]"),
    (re.compile(r"whsec_[A-Za-z0-9+/=]+"), "whsec_[redacted]"),
    # Query-string and form credentials.
    (
        re.compile(
            r"(?i)\b(code|state|token|access_token|refresh_token|client_secret|code_verifier)=[^&\s\"']+"
        ),
        r"\1=[redacted]",
    ),
    # Emails and phone-like digit runs: callers' details have no business in a log line.
    # Each match may only start where a run of such characters starts, so a long text is
    # scanned once (without the lookbehind, a 70 kB summary took seconds).
    (re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"), "[email]"),
    # Not inside a longer token, so ids such as UUIDs and correlation ids stay readable;
    # bounded, since no phone number is written with more than about 20 characters.
    (re.compile(r"(?<![\w-])\+?\d[\d\s().-]{8,22}\d(?![\w-])"), "[phone]"),
]


def redact_text(text: str) -> str:
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def redact_value(key: str, value: Any) -> Any:
    if key.lower() in SENSITIVE_KEYS or key in SENSITIVE_KEYS:
        return "[redacted]"
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(key, v) for v in value]
    return value


_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "color_message",  # uvicorn repeats its message with terminal colours
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; every string passes through the redactor."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact_text(record.getMessage()),
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        portal_id = portal_id_var.get()
        if portal_id is not None:
            entry["portal_id"] = portal_id
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = redact_value(key, value)
        if record.exc_info:
            entry["error"] = redact_text(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request URL at INFO; URLs can carry codes, so keep it quiet.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # /readyz reads the schema revision through alembic, which announces it each time.
    logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)
    # uvicorn's access log repeats what our request middleware logs, with raw query strings.
    logging.getLogger("uvicorn.access").disabled = True
