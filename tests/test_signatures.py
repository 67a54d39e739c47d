"""The verifiers: HubSpot v3, Standard Webhooks and bearer secrets answer only valid or not."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.crypto import Secret, new_webhook_secret
from app.signatures import (
    authenticate_receptionist,
    hubspot_signed_url,
    hubspot_v3_signature,
    verify_bearer,
    verify_hubspot_v3,
    verify_standard_webhook,
)
from tests.webhook_support import standard_headers

# hubspot.md's test vector.
VECTOR_SECRET = "yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy"
VECTOR_URL = "https://www.example.com/webhook_uri"
VECTOR_BODY = b"{'example_field':'example_value'}"
VECTOR_TIMESTAMP = "1693657560000"
VECTOR_SIGNATURE = "K36dawei4A+QBNolUOqo7s91KQDWQ5MXZ/QufNYuk/Y="
VECTOR_NOW = 1693657560.0


def vector(**changes: object) -> bool:
    arguments: dict[str, object] = {
        "secret": VECTOR_SECRET,
        "method": "POST",
        "url": VECTOR_URL,
        "body": VECTOR_BODY,
        "signature": VECTOR_SIGNATURE,
        "timestamp": VECTOR_TIMESTAMP,
        "now": VECTOR_NOW,
    }
    arguments.update(changes)
    return verify_hubspot_v3(**arguments)  # type: ignore[arg-type]


def test_hubspot_test_vector_verifies() -> None:
    assert hubspot_v3_signature(
        VECTOR_SECRET, "POST", VECTOR_URL, VECTOR_BODY, VECTOR_TIMESTAMP
    ) == (VECTOR_SIGNATURE)
    assert vector()


@pytest.mark.parametrize(
    ("offset", "valid"), [(-300, True), (300, True), (-300.001, False), (300.001, False)]
)
def test_hubspot_window_is_five_minutes_both_ways(offset: float, valid: bool) -> None:
    assert vector(now=VECTOR_NOW + offset) is valid


@pytest.mark.parametrize(
    "changes",
    [
        {"secret": "another-secret"},
        {"method": "PUT"},
        {"url": VECTOR_URL + "/"},
        {"body": VECTOR_BODY + b" "},
        {"signature": None},
        {"signature": ""},
        {"signature": "not base64 at all ✓"},
        {"timestamp": None},
        {"timestamp": "1693657560000.0"},
        {"timestamp": " 1693657560000"},
        {"timestamp": "+1693657560000"},
        {"timestamp": "٣"},  # an Arabic-Indic digit: str.isdigit() says yes, int() too
        {"timestamp": "9" * 400},
    ],
)
def test_hubspot_rejects_what_differs_from_the_vector(changes: dict[str, object]) -> None:
    assert not vector(**changes)


def test_signed_url_decodes_only_the_listed_escapes() -> None:
    url = hubspot_signed_url(
        "https://hubline.example/",
        "/webhooks/hubspot",
        "a=%3a%2F%3F%40%21%24%27%28%29%2A%2C%3B&b=%20%25%2B",
    )
    assert url == "https://hubline.example/webhooks/hubspot?a=:/?@!$'()*,;&b=%20%25%2B"


_texts = st.text(max_size=80)
_maybe = st.none() | _texts


@settings(max_examples=300, deadline=None)
@given(
    signature=_maybe,
    timestamp=_maybe | st.integers(0, 10**14).map(str),
    body=st.binary(max_size=200),
    method=_texts,
    url=_texts,
)
def test_hubspot_verifier_answers_only_valid_or_not(
    signature: str | None, timestamp: str | None, body: bytes, method: str, url: str
) -> None:
    result = verify_hubspot_v3(
        secret=VECTOR_SECRET,
        method=method,
        url=url,
        body=body,
        signature=signature,
        timestamp=timestamp,
        now=VECTOR_NOW,
    )
    assert result is False


def _flip(data: bytes, position: int, bit: int) -> bytes:
    position %= len(data)
    return data[:position] + bytes([data[position] ^ (1 << bit)]) + data[position + 1 :]


@settings(max_examples=200, deadline=None)
@given(
    part=st.sampled_from(["body", "timestamp", "url"]),
    position=st.integers(0, 500),
    bit=st.integers(0, 7),
)
def test_hubspot_rejects_any_flipped_byte(part: str, position: int, bit: int) -> None:
    original = {
        "body": VECTOR_BODY,
        "timestamp": VECTOR_TIMESTAMP.encode(),
        "url": VECTOR_URL.encode(),
    }
    flipped = _flip(original[part], position, bit)
    changes: dict[str, object] = {
        "body": flipped if part == "body" else VECTOR_BODY,
        "timestamp": flipped.decode("latin-1") if part == "timestamp" else VECTOR_TIMESTAMP,
        "url": flipped.decode("latin-1") if part == "url" else VECTOR_URL,
    }
    assert not vector(**changes)


# --- Standard Webhooks and bearer ---------------------------------------------------------

SECRET = Secret(new_webhook_secret())
OTHER = Secret(new_webhook_secret())
BODY = b'{"id": "evt_1", "type": "test.ping"}'


def test_standard_signature_verifies_with_any_accepted_secret() -> None:
    headers = standard_headers(SECRET, BODY)
    assert verify_standard_webhook(BODY, headers, [SECRET])
    assert verify_standard_webhook(BODY, headers, [OTHER, SECRET])  # rotation grace
    assert not verify_standard_webhook(BODY, headers, [OTHER])
    assert not verify_standard_webhook(BODY, headers, [])


def test_standard_signature_list_may_hold_several_and_garbage() -> None:
    good = standard_headers(SECRET, BODY)
    other = standard_headers(OTHER, BODY)
    signatures = f"garbage  {other['webhook-signature']} v2,abc {good['webhook-signature']}"
    listed = {**good, "webhook-signature": signatures}
    assert verify_standard_webhook(BODY, listed, [SECRET])


@pytest.mark.parametrize("entry", ["v1,bogus", "v1,AAAA", "v1,abc=", "v1," + "A" * 43 + "B"])
def test_a_malformed_v1_entry_beside_the_valid_signature_is_ignored(entry: str) -> None:
    good = standard_headers(SECRET, BODY)
    listed = {**good, "webhook-signature": f"{entry} {good['webhook-signature']}"}
    assert verify_standard_webhook(BODY, listed, [SECRET])
    assert authenticate_receptionist(BODY, listed, [SECRET])


# -301.5: the header keeps whole seconds, which pulls a future timestamp back by up to 1 s.
@pytest.mark.parametrize("age", [-301.5, 301, 3600])
def test_standard_signature_outside_five_minutes_is_rejected(age: float) -> None:
    headers = standard_headers(SECRET, BODY, timestamp=time.time() - age)
    assert not verify_standard_webhook(BODY, headers, [SECRET])


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"webhook-id": "x", "webhook-timestamp": "1", "webhook-signature": "v1"},
        {"webhook-id": "x", "webhook-timestamp": "nan", "webhook-signature": "v1,AAAA"},
        {"webhook-id": "x", "webhook-timestamp": "inf", "webhook-signature": "v1,AAAA"},
        {"webhook-id": "x", "webhook-timestamp": "1e400", "webhook-signature": "v1,AAAA"},
        {
            "webhook-id": "x",
            "webhook-timestamp": str(int(time.time())),
            "webhook-signature": "v1,A",
        },
        {"webhook-id": "x", "webhook-timestamp": str(int(time.time())), "webhook-signature": ",,,"},
    ],
)
def test_garbage_standard_headers_are_rejected_not_raised(headers: dict[str, str]) -> None:
    assert not verify_standard_webhook(BODY, headers, [SECRET])


def test_a_body_that_is_not_utf8_cannot_be_verified() -> None:
    # standardwebhooks signs text: it cannot check bytes that are not UTF-8, so they are a 401.
    body = b"\xff\xfe"
    headers = standard_headers(SECRET, b"x")
    assert not verify_standard_webhook(body, headers, [SECRET])


def test_bearer_matches_any_accepted_secret_exactly() -> None:
    assert verify_bearer(f"Bearer {SECRET.reveal()}", [OTHER, SECRET])
    assert verify_bearer(f"bearer   {SECRET.reveal()} ", [SECRET])
    assert not verify_bearer(f"Bearer {SECRET.reveal()}x", [SECRET])
    assert not verify_bearer(f"Basic {SECRET.reveal()}", [SECRET])
    assert not verify_bearer("Bearer ", [SECRET])
    assert not verify_bearer("Bearer ✓ non-ascii", [SECRET])
    assert not verify_bearer(None, [SECRET])


_header_names = st.sampled_from(
    ["webhook-id", "webhook-timestamp", "webhook-signature", "authorization", "x-other"]
)


@settings(max_examples=300, deadline=None)
@given(headers=st.dictionaries(_header_names, st.text(max_size=120)), body=st.binary(max_size=200))
def test_receptionist_verifier_answers_only_valid_or_not(
    headers: dict[str, str], body: bytes
) -> None:
    assert authenticate_receptionist(body, headers, [SECRET]) is False


@settings(max_examples=200, deadline=None)
@given(
    # Not the signature itself: base64 has bits a decoder ignores, so some flips of its
    # text decode to the same signature, which is no forgery.
    part=st.sampled_from(["body", "webhook-timestamp", "webhook-id"]),
    position=st.integers(0, 500),
    bit=st.integers(0, 7),
)
def test_receptionist_rejects_any_flipped_byte(part: str, position: int, bit: int) -> None:
    headers = standard_headers(SECRET, BODY)
    assert authenticate_receptionist(BODY, headers, [SECRET])
    body = BODY
    if part == "body":
        body = _flip(BODY, position, bit)
    else:
        headers[part] = _flip(headers[part].encode(), position, bit).decode("latin-1")
    assert not authenticate_receptionist(body, headers, [SECRET])
