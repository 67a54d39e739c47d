"""Webhook authentication: HubSpot's signature v3, Standard Webhooks, and bearer secrets.

Every verifier answers only True or False, whatever it is given: a forged, stale or
garbled request is a 401 at the route, never a 500.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

from standardwebhooks.webhooks import Webhook

from app.crypto import Secret

# HubSpot rejects nothing older than this itself; we also reject the same distance ahead,
# so a captured request cannot be replayed later by pre-dating its timestamp.
HUBSPOT_TOLERANCE_MS = 5 * 60 * 1000
# Standard Webhooks' window, as the `standardwebhooks` library checks it.
STANDARD_TOLERANCE = timedelta(minutes=5)

# The only escapes HubSpot's v3 recipe decodes before signing (hubspot.md).
_SIGNED_URL_ESCAPES = {
    "%3A": ":",
    "%2F": "/",
    "%3F": "?",
    "%40": "@",
    "%21": "!",
    "%24": "$",
    "%27": "'",
    "%28": "(",
    "%29": ")",
    "%2A": "*",
    "%2C": ",",
    "%3B": ";",
}
_ESCAPE_RE = re.compile("|".join(_SIGNED_URL_ESCAPES), re.IGNORECASE)
# A v1 signature is the base64 of an HMAC-SHA256: 32 bytes, 44 characters. Anything else
# in the list is dropped here, before the library, which gives up on the whole list at
# an entry it cannot decode (refusing the valid signature beside it).
_V1_SIGNATURE_RE = re.compile(r"v1,[A-Za-z0-9+/]{43}=")
_STANDARD_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")
_AUTHENTICATING_HEADERS = frozenset({"authorization", *_STANDARD_HEADERS})


def hubspot_signed_url(public_url: str, raw_path: str, query: str = "") -> str:
    """The URL HubSpot called, as v3 signs it: PUBLIC_URL + path (+ query), escapes decoded."""
    url = public_url.rstrip("/") + raw_path
    if query:
        url += "?" + query
    return _ESCAPE_RE.sub(lambda match: _SIGNED_URL_ESCAPES[match.group(0).upper()], url)


def hubspot_v3_signature(secret: str, method: str, url: str, body: bytes, timestamp: str) -> str:
    """base64(HMAC-SHA256(client secret, method + url + body + timestamp))."""
    message = method.encode() + url.encode() + body + timestamp.encode()
    return base64.b64encode(hmac.new(secret.encode(), message, hashlib.sha256).digest()).decode()


def verify_hubspot_v3(
    *,
    secret: str,
    method: str,
    url: str,
    body: bytes,
    signature: str | None,
    timestamp: str | None,
    now: float,
) -> bool:
    """True when `signature` is HubSpot's v3 signature of this request, made within 5 minutes.

    `url` is what `hubspot_signed_url` returns; `now` is the time in epoch seconds.
    """
    if not signature or not timestamp:
        return False
    # Digits only: int() would also take "+1_0 " and read it as a timestamp.
    if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > 16:
        return False
    if abs(now * 1000 - int(timestamp)) > HUBSPOT_TOLERANCE_MS:
        return False
    try:
        expected = hubspot_v3_signature(secret, method, url, body, timestamp)
    except UnicodeEncodeError:  # a URL or method no HTTP request can carry
        return False
    return hmac.compare_digest(expected.encode(), signature.encode("utf-8", "surrogatepass"))


def verify_bearer(authorization: str | None, secrets: Sequence[Secret]) -> bool:
    """True when the Authorization header is `Bearer <one of the secrets>`."""
    if not authorization:
        return False
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    given = token.strip().encode("utf-8", "surrogatepass")
    matched = False
    # Compare against every secret, not stopping at a match, so timing tells nothing.
    for secret in secrets:
        matched |= hmac.compare_digest(given, secret.reveal().encode())
    return matched


def _standard_headers(headers: Mapping[str, str]) -> dict[str, str] | None:
    """The Standard Webhooks headers, keeping well-formed v1 signatures; None if incomplete."""
    lowered = {key.lower(): value for key, value in headers.items()}
    if not all(lowered.get(name) for name in _STANDARD_HEADERS):
        return None
    signatures = [
        part for part in lowered["webhook-signature"].split() if _V1_SIGNATURE_RE.fullmatch(part)
    ]
    if not signatures:
        return None
    return {
        "webhook-id": lowered["webhook-id"],
        "webhook-timestamp": lowered["webhook-timestamp"],
        "webhook-signature": " ".join(signatures),
    }


def verify_standard_webhook(
    body: bytes, headers: Mapping[str, str], secrets: Sequence[Secret]
) -> bool:
    """True when the Standard Webhooks headers carry a valid signature by one of the secrets.

    The signature header may list several signatures separated by spaces (a sender
    rotating its secret signs with both); malformed entries in it are ignored.
    """
    checked = _standard_headers(headers)
    if checked is None:
        return False
    for secret in secrets:
        try:
            # json_parse=False: verify the raw bytes here and parse them at the route, so a
            # correctly signed malformed body is told apart (400) from a forged one (401).
            Webhook(secret.reveal()).verify(body, checked, json_parse=False)
        except Exception:  # noqa: S112 - the library raises bare ValueErrors and friends on garbage
            continue
        return True
    return False


def signed_outside_window(
    body: bytes, headers: Mapping[str, str], secrets: Sequence[Secret]
) -> bool:
    """True when a refused Standard Webhooks request is rightly signed but its timestamp is
    outside the five minutes allowed: the sender's clock is off (or this is a replay).

    Only the holder of the secret can sign rightly, so saying so tells no one else
    anything; for everyone else the refusal stays the same.
    """
    standard = _standard_headers(headers)
    if standard is None:
        return False
    signatures = standard["webhook-signature"].split()
    try:
        signed_at = datetime.fromtimestamp(float(standard["webhook-timestamp"]), tz=UTC)
        text = body.decode()
    except (ValueError, OverflowError, OSError):  # not a time, or not UTF-8
        return False
    # Refused for another reason (a header given twice), a fresh signature says nothing
    # of the clock.
    if abs(datetime.now(UTC) - signed_at) <= STANDARD_TOLERANCE:
        return False
    for secret in secrets:
        try:
            expected = Webhook(secret.reveal()).sign(standard["webhook-id"], signed_at, text)
        except Exception:  # noqa: S112 - as in verify_standard_webhook: an answer, never a 500
            continue
        if any(hmac.compare_digest(expected, signature) for signature in signatures):
            return True
    return False


def authenticate_receptionist(
    body: bytes, headers: Mapping[str, str], secrets: Sequence[Secret]
) -> bool:
    """True when the request carries the portal's secret: as a bearer token or a signature.

    A request giving one of the headers read here twice is refused: the signature would be
    checked against one copy while the route keys the event by another (a captured
    delivery replayed with a webhook-id of the sender's choosing would be stored again).
    """
    lowered: dict[str, str] = {}
    for key, value in headers.items():  # Starlette's headers list every copy
        name = key.lower()
        if name in _AUTHENTICATING_HEADERS and name in lowered:
            return False
        lowered[name] = value
    return verify_bearer(lowered.get("authorization"), secrets) or verify_standard_webhook(
        body, lowered, secrets
    )
