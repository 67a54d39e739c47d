"""Hubline's exceptions: one small tree, each error carrying the context an operator needs.

    HublineError
    ├── ConfigurationError        a setting is missing or malformed; start-up stops
    ├── CryptoError               a ciphertext cannot be read
    │   └── UnknownKeyError       made by a key that is not configured
    ├── EventRejected             an inbound event failed validation (HTTP 4xx)
    ├── HandlerError              raised by an event handler; the retry policy reads it
    │   ├── PermanentError        retrying cannot help: the event fails at once
    │   ├── PortalUnavailable     the portal cannot be served now: its events are parked
    │   ├── UnrecordedWrite       HubSpot made records whose ids were lost: found again later
    │   └── ContactGone           the contact was deleted while syncing: the event is retried
    ├── HubSpotNotReached         an uninstall HubSpot could not be asked for: nothing changed
    └── HubSpotError              HubSpot answered with an error (status, category, correlation id)
        ├── HubSpotAuthError      401/403 after the one refresh-and-retry
        │   └── ClientRefused     the token endpoint refused Hubline's own client credentials
        ├── HubSpotRateLimited    429, after the client's own waits ran out
        ├── HubSpotUnavailable    5xx, 423, timeouts and connection failures, after retries;
        │                         or a refresh failed that way a moment ago (a cooldown)
        ├── HubSpotValidationError 400 VALIDATION_ERROR and friends: a data problem
        ├── HubSpotConflict       409 (a contact with that email already exists)
        └── RefreshRejected       the refresh grant answered invalid_grant: uninstalled or revoked

Messages never contain a token, a secret, or a caller's personal data.
"""

from __future__ import annotations

import re


class HublineError(Exception):
    """Base of every error Hubline raises on purpose."""


class ConfigurationError(HublineError):
    """A setting is missing or malformed."""


class CryptoError(HublineError):
    """A ciphertext could not be decrypted (tampered, moved to another row, or wrong key)."""

    def __init__(self, message: str, *, context: str = "", key_id: str = "") -> None:
        super().__init__(message)
        self.context = context
        self.key_id = key_id


class UnknownKeyError(CryptoError):
    """The ciphertext names a key id that TOKEN_ENCRYPTION_KEYS does not hold."""


class EventRejected(HublineError):
    """An inbound event failed validation; `problems` lists field errors."""

    def __init__(self, problems: list[dict[str, str]]) -> None:
        super().__init__("; ".join(f"{p['field']}: {p['message']}" for p in problems))
        self.problems = problems


class HandlerError(HublineError):
    """An event handler could not finish; the retry policy decides what happens next."""


class PermanentError(HandlerError):
    """Retrying cannot help (bad data, a rejected record)."""


class PortalUnavailable(HandlerError):
    """The portal cannot be served now (needs re-authorization, or uninstalled)."""

    def __init__(self, portal_id: int, reason: str) -> None:
        super().__init__(f"portal {portal_id} cannot be served: {reason}")
        self.portal_id = portal_id
        self.reason = reason


class UnrecordedWrite(HandlerError):
    """HubSpot made records this attempt could not write down (their ids are lost to it).

    Its retry must find them by searching, which shows new records only after a few
    seconds: it waits as long as after a write whose answer was lost.
    """

    ambiguous = True


class ContactGone(HandlerError):
    """The contact disappeared while the event was syncing; it is tried again."""


class HubSpotNotReached(HublineError):
    """HubSpot could not be asked to uninstall the app now: the portal was left connected.

    Disconnecting anyway would delete the tokens that the uninstall needs, and the app
    would stay installed on HubSpot with no way left to remove it from here.
    """


class HubSpotError(HublineError):
    """HubSpot answered with an error."""

    def __init__(
        self,
        message: str,
        *,
        portal_id: int | None = None,
        status_code: int | None = None,
        category: str | None = None,
        correlation_id: str | None = None,
        retry_after: float | None = None,
        ambiguous: bool = False,
        detail: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        # HubSpot's own words, which may repeat what we sent (a caller's name, a summary):
        # read to learn which properties it refused, never logged or stored.
        self.detail = detail
        self.portal_id = portal_id
        self.status_code = status_code
        self.category = category
        self.correlation_id = correlation_id
        self.retry_after = retry_after
        # A write that failed in a way that leaves open whether HubSpot carried it out.
        self.ambiguous = ambiguous

    def __str__(self) -> str:
        parts = [self.message]
        if self.status_code is not None:
            parts.append(f"status={self.status_code}")
        if self.category:
            parts.append(f"category={self.category}")
        if self.portal_id is not None:
            parts.append(f"portal={self.portal_id}")
        if self.correlation_id:
            parts.append(f"correlationId={self.correlation_id}")
        return " ".join(parts)


# What `HubSpotError.__str__` appends to its message, as stored in an event's last_error.
_CONTEXT_FIELD = re.compile(r" (status|category|portal|correlationId)=(\S+)")


def read_error_text(text: str) -> tuple[str, dict[str, str]]:
    """A stored error's words, and the context fields a HubSpot error appended to them."""
    return _CONTEXT_FIELD.sub("", text).strip(), dict(_CONTEXT_FIELD.findall(text))


class HubSpotAuthError(HubSpotError):
    """HubSpot refused the token even after one refresh and retry."""


class ClientRefused(HubSpotAuthError):
    """The token endpoint refused Hubline's client id or secret, not a portal's grant.

    A configuration problem of the deployment (a mistyped secret, another app's
    credentials): every portal's refresh fails alike, and none is uninstalled for it.
    """


class HubSpotRateLimited(HubSpotError):
    """HubSpot answered 429 and the client's own waiting did not get through."""


class HubSpotUnavailable(HubSpotError):
    """HubSpot answered 5xx or did not answer in time."""


class HubSpotValidationError(HubSpotError):
    """HubSpot rejected the data we sent; retrying the same data cannot help."""


class HubSpotConflict(HubSpotError):
    """HubSpot answered 409: a record with that unique value already exists."""

    existing_id: str | None = None

    @staticmethod
    def parse_existing_id(message: str) -> str | None:
        match = re.search(r"Existing ID:\s*(\d+)", message)
        return match.group(1) if match else None


class RefreshRejected(HubSpotError):
    """The refresh grant answered invalid_grant: the app was uninstalled or access revoked."""
