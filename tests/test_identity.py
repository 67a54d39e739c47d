"""The identity index: normalized values, blind hashes, and the writes the handlers make."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from app import identity
from app.crypto import TokenCipher, generate_key
from app.db import SessionFactory, transaction
from tests.webhook_support import identity_rows

PORTAL = 1001
T0 = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("raw", "region", "expected"),
    [
        ("+1 415 555 0100", "US", "+14155550100"),
        ("(415) 555-0100", "US", "+14155550100"),
        ("415.555.0100", "US", "+14155550100"),
        ("020 7946 0018", "GB", "+442079460018"),
        ("+44 20 7946 0018", "US", "+442079460018"),
        ("123", "US", None),
        ("call me", "US", None),
        ("", "US", None),
        (None, "US", None),
        ("1" * 200, "US", None),
        # A word beside the number, as people type one into a contact: read as a vanity
        # number's letters it was too long to dial, and the contact was made twice.
        ("+1 415 555 0100 (cell)", "US", "+14155550100"),
        ("415 555 0100 / office", "US", "+14155550100"),
        ("+1 415 555 0100 mobile", "US", "+14155550100"),
        ("+44 20 7946 0018 (home)", "US", "+442079460018"),
        ("1-800-FLOWERS", "US", "+18003569377"),  # a vanity number stays one
        # Seven digits dial nobody, a word beside them or not.
        ("555 0100 (cell)", "US", None),
        ("order 12345", "US", None),
    ],
)
def test_normalize_phone(raw: str | None, region: str, expected: str | None) -> None:
    assert identity.normalize_phone(raw, region) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (" Ada@Example.COM ", "ada@example.com"),
        ("a.b+tag@sub.example.org", "a.b+tag@sub.example.org"),
        ("not-an-email", None),
        ("a@b", None),
        ("a b@example.com", None),
        ("", None),
        (None, None),
    ],
)
def test_normalize_email(raw: str | None, expected: str | None) -> None:
    assert identity.normalize_email(raw) == expected


async def _lookup(
    sessions: SessionFactory, cipher: TokenCipher, kind: str, value: str, portal_id: int = PORTAL
) -> str | None:
    async with sessions() as session:
        return await identity.lookup(portal_id, kind, value, session=session, cipher=cipher)


async def test_the_index_stores_hashes_not_values(
    sessions: SessionFactory, cipher: TokenCipher
) -> None:
    async with transaction(sessions) as session:
        await identity.set_identities(
            PORTAL,
            "51",
            phones=["+14155550100"],
            emails=["ada@example.com"],
            session=session,
            cipher=cipher,
            as_of=T0,
        )
    rows = await identity_rows(sessions)
    assert {row.kind for row in rows} == {"phone", "email"}
    values = {"phone": "+14155550100", "email": "ada@example.com"}
    for row in rows:
        # The keyed hash (hex), never the value: not even a short run of it can be checked
        # for, since the letters a-f and digits occur in any hex digest.
        assert row.value_hash == cipher.blind_index(row.kind, values[row.kind], PORTAL)
        assert values[row.kind] not in row.value_hash
        assert "4155550100" not in row.value_hash
    assert await _lookup(sessions, cipher, "phone", "+14155550100") == "51"
    assert await _lookup(sessions, cipher, "email", "ada@example.com") == "51"
    # Per portal: another portal's index does not answer for this one.
    assert await _lookup(sessions, cipher, "phone", "+14155550100", portal_id=1002) is None


async def test_find_contact_tries_phones_then_emails(
    sessions: SessionFactory, cipher: TokenCipher
) -> None:
    async with transaction(sessions) as session:
        await identity.upsert(
            PORTAL, "email", "ada@example.com", "7", session=session, cipher=cipher, as_of=T0
        )
        await identity.upsert(
            PORTAL, "phone", "+14155550100", "8", session=session, cipher=cipher, as_of=T0
        )
    async with sessions() as session:
        found = await identity.find_contact(
            PORTAL,
            phones=["+14155550199", "+14155550100"],
            emails=["ada@example.com"],
            session=session,
            cipher=cipher,
        )
        assert found == "8"
        by_email = await identity.find_contact(
            PORTAL, phones=["+1999"], emails=["ada@example.com"], session=session, cipher=cipher
        )
        assert by_email == "7"


async def test_replace_remove_repoint_and_erase(
    sessions: SessionFactory, cipher: TokenCipher
) -> None:
    async with transaction(sessions) as session:
        await identity.set_identities(
            PORTAL, "1", phones=["+14155550100", "+14155550101"], emails=["a@example.com"],
            session=session, cipher=cipher, as_of=T0,
        )  # fmt: skip
        await identity.set_identities(
            PORTAL,
            "2",
            phones=["+14155550102"],
            emails=[],
            session=session,
            cipher=cipher,
            as_of=T0,
        )
        # A phone change: the contact's phones are now exactly these.
        await identity.replace_kind(
            PORTAL, "1", "phone", ["+14155550199"], session=session, cipher=cipher, as_of=T0
        )
    assert await _lookup(sessions, cipher, "phone", "+14155550100") is None
    assert await _lookup(sessions, cipher, "phone", "+14155550199") == "1"

    async with transaction(sessions) as session:
        assert await identity.repoint(PORTAL, ["2"], "1", session=session, as_of=T0) == 1
    assert await _lookup(sessions, cipher, "phone", "+14155550102") == "1"

    async with transaction(sessions) as session:
        assert await identity.remove_contact(PORTAL, "1", session=session, as_of=T0) == 3
    for value in ("+14155550199", "+14155550102"):
        assert await _lookup(sessions, cipher, "phone", value) is None
    async with sessions() as session:
        # Removed entries are kept (marked), so a later privacy deletion can use them.
        assert len(await identity.contact_hashes(PORTAL, "1", session=session)) == 3
        assert (
            await identity.contact_hashes(PORTAL, "1", session=session, include_removed=False)
            == set()
        )
        assert await identity.last_change(PORTAL, "1", "email", session=session) == T0

    async with transaction(sessions) as session:
        erased = await identity.erase_contact(PORTAL, "1", session=session, as_of=T0)
        assert len(erased) == 3
        assert await identity.erased_contacts(PORTAL, ["1", "2"], session=session) == {"1"}
    rows = await identity_rows(sessions)
    assert [(row.kind, row.value_hash) for row in rows] == [("erased", "contact:1")]

    async with transaction(sessions) as session:
        assert await identity.purge_removed(session=session, before=T0 + timedelta(days=1)) == 1
    assert await identity_rows(sessions) == []


async def test_a_value_moves_to_the_contact_that_has_it_now(
    sessions: SessionFactory, cipher: TokenCipher
) -> None:
    async with transaction(sessions) as session:
        for contact in ("1", "2"):
            await identity.upsert(
                PORTAL, "phone", "+14155550100", contact, session=session, cipher=cipher, as_of=T0
            )
    assert await _lookup(sessions, cipher, "phone", "+14155550100") == "2"
    assert len(await identity_rows(sessions)) == 1


async def test_contacts_left_with_no_value_lose_their_entries_and_write_none(
    sessions: SessionFactory, cipher: TokenCipher
) -> None:
    """With no value left to write, the insert had no rows: an INSERT of no parameter
    sets, which SQLite refused ("near ON") and failed the batch."""
    async with transaction(sessions) as session:
        await identity.set_many(
            PORTAL, {"1": (["+14155550100"], [])}, session=session, cipher=cipher, as_of=T0
        )
    async with transaction(sessions) as session:
        await identity.set_many(PORTAL, {"1": ([], [])}, session=session, cipher=cipher, as_of=T0)
    assert await identity_rows(sessions) == []


async def test_a_restored_contact_is_found_again(
    sessions: SessionFactory, cipher: TokenCipher
) -> None:
    async with transaction(sessions) as session:
        await identity.set_identities(
            PORTAL,
            "1",
            phones=["+14155550100"],
            emails=[],
            session=session,
            cipher=cipher,
            as_of=T0,
        )
        await identity.remove_contact(PORTAL, "1", session=session, as_of=T0)
        await identity.set_identities(
            PORTAL,
            "1",
            phones=["+14155550100"],
            emails=[],
            session=session,
            cipher=cipher,
            as_of=T0,
        )
    assert await _lookup(sessions, cipher, "phone", "+14155550100") == "1"


async def test_lookups_work_while_keys_rotate(
    sessions: SessionFactory, cipher: TokenCipher
) -> None:
    async with transaction(sessions) as session:
        await identity.upsert(
            PORTAL, "phone", "+14155550100", "1", session=session, cipher=cipher, as_of=T0
        )
    # A new key goes first; the old one still decrypts (and still matches old hashes).
    rotated = TokenCipher.from_setting(generate_key() + "," + _key_setting(cipher))
    assert await _lookup(sessions, rotated, "phone", "+14155550100") == "1"
    async with transaction(sessions) as session:
        await identity.upsert(
            PORTAL, "phone", "+14155550100", "2", session=session, cipher=rotated, as_of=T0
        )
    rows = await identity_rows(sessions)
    assert [row.value_hash.split(":")[0] for row in rows] == [rotated.primary_key_id]
    assert await _lookup(sessions, rotated, "phone", "+14155550100") == "2"


def _key_setting(cipher: TokenCipher) -> str:
    from tests.conftest import TEST_KEY

    assert cipher.primary_key_id == TokenCipher.from_setting(TEST_KEY).primary_key_id
    return TEST_KEY


def test_caller_hashes_match_under_any_key(cipher: TokenCipher) -> None:
    stored = {("phone", cipher.blind_index("phone", "+14155550100", PORTAL))}
    rotated = TokenCipher.from_setting(generate_key() + "," + _key_setting(cipher))
    caller = identity.CallerHashes.of(rotated, PORTAL, phone="+14155550100", email=None)
    assert caller.matches(stored)
    other = identity.CallerHashes.of(rotated, PORTAL, phone="+14155550101", email="a@example.com")
    assert not other.matches(stored)
