"""The signatures the sandbox puts on webhooks follow HubSpot's recipes."""

from __future__ import annotations

import base64
import hashlib
import hmac

from app.sandbox import signature_v1, signature_v3
from app.sandbox.webhooks import signed_headers, signed_url

VECTOR_SECRET = "yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy"
VECTOR_URL = "https://www.example.com/webhook_uri"
VECTOR_BODY = b"{'example_field':'example_value'}"
VECTOR_TIMESTAMP = 1693657560000
VECTOR_SIGNATURE = "K36dawei4A+QBNolUOqo7s91KQDWQ5MXZ/QufNYuk/Y="


def test_v3_signature_matches_hubspots_test_vector() -> None:
    signature = signature_v3(VECTOR_SECRET, "POST", VECTOR_URL, VECTOR_BODY, VECTOR_TIMESTAMP)

    assert signature == VECTOR_SIGNATURE


def test_test_vector_is_hmac_sha256_of_method_url_body_timestamp() -> None:
    # The recipe written out by hand, so the vector checks the recipe and not only our code.
    message = b"POST" + VECTOR_URL.encode() + VECTOR_BODY + str(VECTOR_TIMESTAMP).encode()
    digest = hmac.new(VECTOR_SECRET.encode(), message, hashlib.sha256).digest()

    assert base64.b64encode(digest).decode() == VECTOR_SIGNATURE


def test_v3_signature_changes_with_every_input() -> None:
    base = signature_v3(VECTOR_SECRET, "POST", VECTOR_URL, VECTOR_BODY, VECTOR_TIMESTAMP)

    assert signature_v3("other", "POST", VECTOR_URL, VECTOR_BODY, VECTOR_TIMESTAMP) != base
    assert (
        signature_v3(VECTOR_SECRET, "POST", VECTOR_URL + "x", VECTOR_BODY, VECTOR_TIMESTAMP) != base
    )
    assert signature_v3(VECTOR_SECRET, "POST", VECTOR_URL, b"{}", VECTOR_TIMESTAMP) != base
    assert (
        signature_v3(VECTOR_SECRET, "POST", VECTOR_URL, VECTOR_BODY, VECTOR_TIMESTAMP + 1) != base
    )


def test_signed_url_decodes_only_the_listed_escapes() -> None:
    url = "https://h.example/p%3Aa%2Fb%3Fc%40d%21e%24f%27g%28h%29i%2Aj%2Ck%3Bl?q=%20%26"

    assert signed_url(url) == "https://h.example/p:a/b?c@d!e$f'g(h)i*j,k;l?q=%20%26"


def test_v1_signature_is_hex_sha256_of_secret_and_body() -> None:
    expected = hashlib.sha256(VECTOR_SECRET.encode() + VECTOR_BODY).hexdigest()

    assert signature_v1(VECTOR_SECRET, VECTOR_BODY) == expected


def test_signed_headers_carry_v3_and_legacy_v1() -> None:
    headers = signed_headers(VECTOR_SECRET, VECTOR_URL, VECTOR_BODY, VECTOR_TIMESTAMP)

    assert headers["X-HubSpot-Signature-v3"] == VECTOR_SIGNATURE
    assert headers["X-HubSpot-Request-Timestamp"] == str(VECTOR_TIMESTAMP)
    assert headers["X-HubSpot-Signature-Version"] == "v1"
    assert headers["X-HubSpot-Signature"] == signature_v1(VECTOR_SECRET, VECTOR_BODY)
