"""Structured JSON logs, one line each, with redaction applied in one place for every logger.

Redaction happens twice, both here: `install_redaction` wraps the log-record factory, so
every record's message and traceback are redacted when the record is made (whatever
handler later writes it: ours, pytest's, a library's), and `JsonFormatter` redacts the
structured fields a call site adds. A value is masked when its key names a secret or a
caller's detail, when it looks like a credential, an email or a phone number (raw or
URL-encoded), or when it is one of the app's own secrets (raw, URL-encoded or base64).
A line that mentions a HubSpot error carries its correlationId, status and portal id.
"""

from __future__ import annotations

import base64
import contextvars
import json
import logging
import re
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, quote_plus, unquote_plus

from app.errors import HubSpotError

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
    # \w, not [A-Za-z0-9]: addresses may hold any letter (josé@example.com).
    (re.compile(r"(?<![\w.%+-])[\w.%+-]+@[\w.-]+\.[^\W\d_]{2,}"), "[email]"),
    # Not inside a longer token, so ids such as UUIDs and correlation ids stay readable;
    # bounded, since no phone number is written with more than about 20 characters.
    (re.compile(r"(?<![\w-])\+?\d[\d\s().-]{8,22}\d(?![\w-])"), "[phone]"),
]


# The app's own long-lived secrets (client secret, admin token) in every form they may
# take in a line: masked wherever they appear, even where no pattern would catch them.
_known_secrets: set[str] = set()
MIN_KNOWN_SECRET = 8


def _encodings(value: str) -> set[str]:
    raw = value.encode()
    return {
        value,
        quote(value, safe=""),
        quote_plus(value),
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
    }


def register_secrets(*values: str) -> None:
    """Mask these values (and their URL-encoded and base64 forms) in every log line."""
    for value in values:
        if len(value) >= MIN_KNOWN_SECRET:
            _known_secrets.update(_encodings(value))


def _apply_patterns(text: str) -> str:
    for secret in _known_secrets:
        if secret in text:
            text = text.replace(secret, "[redacted]")
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def redact_text(text: str) -> str:
    clean = _apply_patterns(text)
    if "%" in text:
        # A URL-encoded email, phone or credential (a logged URL or form body) hides from
        # the patterns: when decoding reveals one, the line is kept decoded and redacted.
        decoded = unquote_plus(text)
        if decoded != text:
            clean_decoded = _apply_patterns(decoded)
            if clean_decoded != decoded:
                return clean_decoded
    return clean


def redact_value(key: str, value: Any) -> Any:
    if key.lower() in SENSITIVE_KEYS or key in SENSITIVE_KEYS:
        return "[redacted]"
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [redact_value(key, v) for v in value]
    # Anything else is written as its text: an exception, an object whose str() holds a URL.
    return redact_text(str(value))


# --- records: redacted when made, whatever handler writes them -----------------------------


def _hubspot_error_in(record: logging.LogRecord) -> HubSpotError | None:
    candidates: list[Any] = []
    if record.exc_info and record.exc_info[1] is not None:
        candidates.append(record.exc_info[1])
    if isinstance(record.args, tuple):
        candidates.extend(record.args)
    elif isinstance(record.args, Mapping):
        candidates.extend(record.args.values())
    for candidate in candidates:
        seen = 0
        while isinstance(candidate, BaseException) and seen < 5:
            if isinstance(candidate, HubSpotError):
                return candidate
            candidate = candidate.__cause__ or candidate.__context__
            seen += 1
    return None


def redact_record(record: logging.LogRecord) -> None:
    """Redact a record's message and traceback in place (its structured fields at format)."""
    error = _hubspot_error_in(record)
    if error is not None:
        record.__dict__["_hubspot_error"] = error
    try:
        message = record.getMessage()
    except (TypeError, ValueError):  # a call site's format mismatch: let logging report it
        return
    clean = redact_text(message)
    if clean != message:
        record.msg, record.args = clean, ()
    if record.exc_info and not record.exc_text:
        # Every standard formatter prints exc_text when it is set.
        record.exc_text = redact_text(_PLAIN.formatException(record.exc_info))


_PLAIN = logging.Formatter()
RecordFactory = Callable[..., logging.LogRecord]


class _RedactingFactory:
    """Wraps the log-record factory that was in place, redacting each record it makes."""

    def __init__(self, inner: RecordFactory) -> None:
        self.inner = inner

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.inner(*args, **kwargs)
        redact_record(record)
        return record


def install_redaction(*secrets: str) -> None:
    """Redact every log record this process makes (idempotent); mask `secrets` everywhere."""
    register_secrets(*secrets)
    if not isinstance(logging.getLogRecordFactory(), _RedactingFactory):
        logging.setLogRecordFactory(_RedactingFactory(logging.getLogRecordFactory()))


def hubspot_error_fields(error: BaseException | None) -> dict[str, Any]:
    """What a log line about this error needs: HubSpot's correlationId, status, portal."""
    if not isinstance(error, HubSpotError):
        return {}
    fields: dict[str, Any] = {
        "correlation_id": error.correlation_id,
        "hubspot_status": error.status_code,
    }
    if error.category:
        fields["hubspot_category"] = error.category
    if error.portal_id is not None:
        fields["portal_id"] = error.portal_id
    return fields


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
        error = getattr(record, "_hubspot_error", None) or _hubspot_error_in(record)
        for key, value in hubspot_error_fields(error).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["error"] = redact_text(record.exc_text or self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO") -> None:
    install_redaction()
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
