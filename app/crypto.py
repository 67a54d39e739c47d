"""Encryption at rest: AES-256-GCM ciphertexts bound to their portal and field, and keyed hashes.

A ciphertext is ``VERSION || key id (4 bytes) || nonce (12 bytes) || AES-GCM(plaintext)``.
Its associated data is a context string naming the table, the field and the portal
(and the row where one portal has many), so a ciphertext copied into another
portal's row or another column fails to decrypt instead of yielding someone
else's token.

``TOKEN_ENCRYPTION_KEYS`` holds one or more keys as ``hubline keys generate`` prints
them: the first encrypts, all decrypt. A key's id is derived from the key itself,
so an operator only ever copies one string.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from app.errors import ConfigurationError, CryptoError, UnknownKeyError

FORMAT_VERSION = 1
KEY_BYTES = 32
NONCE_BYTES = 12
KEY_ID_BYTES = 4
HEADER_BYTES = 1 + KEY_ID_BYTES + NONCE_BYTES


class Secret:
    """A plaintext secret held in memory only; `repr` and `str` never show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


def same_text(given: str, expected: str) -> bool:
    """Constant-time equality of two strings, whatever they hold (hmac compares str only
    when both are ASCII, and raises on anything else a client can send)."""
    return hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


def generate_key() -> str:
    """A new random key in the form TOKEN_ENCRYPTION_KEYS takes."""
    return base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).decode().rstrip("=")


def key_id_of(key: bytes) -> str:
    """The public id of a key: derived from it, so it cannot be mismatched."""
    digest = hashlib.sha256(b"hubline-key-id\x00" + key).digest()
    return digest[:KEY_ID_BYTES].hex()


def parse_keys(setting: str) -> list[bytes]:
    """Parse TOKEN_ENCRYPTION_KEYS; the message names the position of a bad key, never the key."""
    parts = [part.strip() for part in setting.split(",") if part.strip()]
    if not parts:
        raise ConfigurationError("TOKEN_ENCRYPTION_KEYS is required")
    keys = []
    for position, part in enumerate(parts, start=1):
        try:
            key = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != KEY_BYTES:
            raise ConfigurationError(
                f"TOKEN_ENCRYPTION_KEYS key #{position} is not a key from `hubline keys generate`"
            )
        keys.append(key)
    if len({key_id_of(key) for key in keys}) != len(keys):
        raise ConfigurationError("TOKEN_ENCRYPTION_KEYS lists the same key twice")
    return keys


def field_context(table: str, field: str, portal_id: int, *row: object) -> str:
    """Associated data binding a ciphertext to its table, field, portal and (optionally) row."""
    suffix = "".join(f"/{part}" for part in row)
    return f"hubline:{table}.{field}:portal={portal_id}{suffix}"


@dataclass(frozen=True)
class _Key:
    key_id: str
    aead: AESGCM
    index_key: bytes


class TokenCipher:
    """Encrypts with the first configured key; decrypts with any of them."""

    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ConfigurationError("TOKEN_ENCRYPTION_KEYS is required")
        self._keys = [
            _Key(key_id_of(key), AESGCM(key), _derive(key, b"hubline blind index v1"))
            for key in keys
        ]
        self._by_id = {key.key_id: key for key in self._keys}
        self._purpose_root = _derive(keys[0], b"hubline purpose keys v1")

    @classmethod
    def from_setting(cls, setting: str) -> TokenCipher:
        return cls(parse_keys(setting))

    def __repr__(self) -> str:
        return f"TokenCipher(key_ids={self.key_ids!r})"

    @property
    def primary_key_id(self) -> str:
        return self._keys[0].key_id

    @property
    def key_ids(self) -> list[str]:
        return [key.key_id for key in self._keys]

    def encrypt(self, plaintext: str | bytes, *, context: str) -> bytes:
        data = plaintext.encode() if isinstance(plaintext, str) else plaintext
        key = self._keys[0]
        nonce = os.urandom(NONCE_BYTES)
        sealed = key.aead.encrypt(nonce, data, context.encode())
        return bytes([FORMAT_VERSION]) + bytes.fromhex(key.key_id) + nonce + sealed

    def decrypt(self, ciphertext: bytes, *, context: str) -> bytes:
        key_id = self.key_id_of_ciphertext(ciphertext, context=context)
        key = self._by_id.get(key_id)
        if key is None:
            raise UnknownKeyError(
                f"cannot decrypt {_describe(context)}: it was made by key {key_id}, "
                "which TOKEN_ENCRYPTION_KEYS does not hold",
                context=context,
                key_id=key_id,
            )
        nonce = ciphertext[1 + KEY_ID_BYTES : HEADER_BYTES]
        try:
            return key.aead.decrypt(nonce, ciphertext[HEADER_BYTES:], context.encode())
        except InvalidTag:
            raise CryptoError(
                f"cannot decrypt {_describe(context)} with key {key_id}: the ciphertext was "
                "tampered with or belongs to another portal or field",
                context=context,
                key_id=key_id,
            ) from None

    def decrypt_str(self, ciphertext: bytes, *, context: str) -> str:
        return self.decrypt(ciphertext, context=context).decode()

    def key_id_of_ciphertext(self, ciphertext: bytes, *, context: str = "") -> str:
        if len(ciphertext) < HEADER_BYTES + 16 or ciphertext[0] != FORMAT_VERSION:
            raise CryptoError(
                f"cannot decrypt {_describe(context)}: not a Hubline ciphertext", context=context
            )
        return ciphertext[1 : 1 + KEY_ID_BYTES].hex()

    def reencrypt(self, ciphertext: bytes, *, context: str) -> bytes | None:
        """The ciphertext under the primary key, or None when it already is."""
        if self.key_id_of_ciphertext(ciphertext, context=context) == self.primary_key_id:
            return None
        return self.encrypt(self.decrypt(ciphertext, context=context), context=context)

    def derive_key(self, purpose: str) -> bytes:
        """A key for one purpose (signing a session cookie), derived from the primary key."""
        return _derive(self._purpose_root, b"hubline purpose: " + purpose.encode())

    def blind_index(self, kind: str, normalized: str, portal_id: int) -> str:
        """A keyed hash of a normalized phone or email: lookups without storing the value."""
        return self._blind_index(self._keys[0], kind, normalized, portal_id)

    def blind_indexes(self, kind: str, normalized: str, portal_id: int) -> list[str]:
        """The keyed hash under every configured key: what a lookup must try during rotation."""
        return [self._blind_index(key, kind, normalized, portal_id) for key in self._keys]

    @staticmethod
    def _blind_index(key: _Key, kind: str, normalized: str, portal_id: int) -> str:
        message = f"{portal_id}\x00{kind}\x00{normalized}".encode()
        return key.key_id + ":" + hmac.new(key.index_key, message, hashlib.sha256).hexdigest()


def new_webhook_secret() -> str:
    """A receptionist signing secret in the Standard Webhooks form."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _derive(key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key)


def _describe(context: str) -> str:
    return context.removeprefix("hubline:") or "a ciphertext"
