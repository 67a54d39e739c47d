"""The token cipher: AEAD round trips, binding to portal and field, keys and their ids."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.crypto import Secret, TokenCipher, field_context, generate_key, key_id_of, parse_keys
from app.errors import ConfigurationError, CryptoError, UnknownKeyError

KEY_A = generate_key()
KEY_B = generate_key()


def test_round_trip_returns_the_plaintext() -> None:
    cipher = TokenCipher.from_setting(KEY_A)
    context = field_context("oauth_tokens", "access_token", 1001)
    sealed = cipher.encrypt("CKXx-token", context=context)
    assert b"CKXx-token" not in sealed
    assert cipher.decrypt_str(sealed, context=context) == "CKXx-token"


@given(st.binary(max_size=600), st.integers(min_value=1, max_value=2**40))
def test_any_plaintext_round_trips(plaintext: bytes, portal_id: int) -> None:
    cipher = TokenCipher.from_setting(KEY_A)
    context = field_context("events", "payload", portal_id, "abc")
    assert cipher.decrypt(cipher.encrypt(plaintext, context=context), context=context) == plaintext


def test_ciphertext_moved_to_another_portal_fails() -> None:
    cipher = TokenCipher.from_setting(KEY_A)
    sealed = cipher.encrypt("token", context=field_context("oauth_tokens", "access_token", 1001))
    with pytest.raises(CryptoError, match="portal=1002") as caught:
        cipher.decrypt(sealed, context=field_context("oauth_tokens", "access_token", 1002))
    assert caught.value.key_id == cipher.primary_key_id


def test_ciphertext_moved_to_another_field_fails() -> None:
    cipher = TokenCipher.from_setting(KEY_A)
    sealed = cipher.encrypt("token", context=field_context("oauth_tokens", "access_token", 1001))
    with pytest.raises(CryptoError, match="refresh_token"):
        cipher.decrypt(sealed, context=field_context("oauth_tokens", "refresh_token", 1001))


def test_tampered_ciphertext_fails_naming_portal_and_key() -> None:
    cipher = TokenCipher.from_setting(KEY_A)
    context = field_context("oauth_tokens", "access_token", 7)
    sealed = bytearray(cipher.encrypt("token", context=context))
    sealed[-1] ^= 0x01
    with pytest.raises(CryptoError) as caught:
        cipher.decrypt(bytes(sealed), context=context)
    assert "portal=7" in str(caught.value)
    assert cipher.primary_key_id in str(caught.value)


def test_garbage_is_a_clear_error_not_an_empty_token() -> None:
    cipher = TokenCipher.from_setting(KEY_A)
    with pytest.raises(CryptoError, match="not a Hubline ciphertext"):
        cipher.decrypt(b"", context=field_context("oauth_tokens", "access_token", 7))


def test_first_key_encrypts_and_every_key_decrypts() -> None:
    old = TokenCipher.from_setting(KEY_A)
    both = TokenCipher.from_setting(f"{KEY_B},{KEY_A}")
    context = field_context("receptionist_secrets", "secret", 3)
    sealed_old = old.encrypt("whsec_x", context=context)
    assert both.decrypt_str(sealed_old, context=context) == "whsec_x"
    assert both.key_id_of_ciphertext(both.encrypt("y", context=context)) == key_id_of(
        parse_keys(KEY_B)[0]
    )
    rewritten = both.reencrypt(sealed_old, context=context)
    assert rewritten is not None
    assert both.key_id_of_ciphertext(rewritten) == both.primary_key_id
    assert both.reencrypt(rewritten, context=context) is None


def test_unknown_key_id_names_the_key() -> None:
    context = field_context("oauth_tokens", "refresh_token", 5)
    sealed = TokenCipher.from_setting(KEY_A).encrypt("r", context=context)
    other = TokenCipher.from_setting(KEY_B)
    with pytest.raises(UnknownKeyError) as caught:
        other.decrypt(sealed, context=context)
    assert caught.value.key_id == key_id_of(parse_keys(KEY_A)[0])
    assert caught.value.key_id in str(caught.value)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("", "required"),
        ("not-a-key", "key #1"),
        (f"{KEY_A},short", "key #2"),
        (f"{KEY_A},{KEY_A}", "same key twice"),
    ],
)
def test_bad_key_settings_are_named_without_the_key(setting: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as caught:
        parse_keys(setting)
    assert KEY_A not in str(caught.value)


def test_secret_hides_its_value() -> None:
    secret = Secret("pat-na1-abcdef")
    assert "pat-na1" not in repr(secret)
    assert "pat-na1" not in str(secret)
    assert "pat-na1" not in f"{secret}"
    assert secret.reveal() == "pat-na1-abcdef"


def test_blind_index_is_keyed_and_portal_scoped() -> None:
    cipher = TokenCipher.from_setting(KEY_A)
    one = cipher.blind_index("phone", "+14155550100", 1001)
    assert "4155550100" not in one
    assert one == cipher.blind_index("phone", "+14155550100", 1001)
    assert one != cipher.blind_index("phone", "+14155550100", 1002)
    assert one != TokenCipher.from_setting(KEY_B).blind_index("phone", "+14155550100", 1001)
    rotated = TokenCipher.from_setting(f"{KEY_B},{KEY_A}")
    assert one in rotated.blind_indexes("phone", "+14155550100", 1001)
