"""The pure parts of the sync: names, phones, timestamps, bodies, HubSpot's error details."""

from __future__ import annotations

from datetime import UTC, datetime

from app.errors import HubSpotValidationError
from app.hubspot.times import millis, moment, stamp
from app.sync import (
    MAX_TEXT,
    engagement_body,
    number_text,
    phone_search_digits,
    property_errors,
    reason_of,
    split_name,
)


def test_numbers_are_written_in_digits_never_with_an_exponent() -> None:
    assert number_text(1e-07) == "0.0000001"  # repr() wrote "1e-07"
    assert number_text(97.5) == "97.5"
    assert number_text(100.0) == "100"
    assert number_text(0.1) == "0.1"  # the shortest digits, not 0.1000000000000000055…


def test_the_last_word_is_the_last_name() -> None:
    assert split_name("Ada King Lovelace") == ("Ada King", "Lovelace")
    assert split_name("  Cher ") == ("Cher", None)
    assert split_name(None) == (None, None)
    assert split_name("") == (None, None)


def test_phone_search_digits_are_what_hubspot_may_have_calculated() -> None:
    assert phone_search_digits("+14155550100") == ["4155550100"]
    # Typed without the country code, a number keeps its trunk prefix.
    assert phone_search_digits("+442079460958") == ["2079460958", "02079460958"]
    assert phone_search_digits("+390212345678") == ["212345678", "0212345678"]
    assert phone_search_digits("not a phone") == []


def test_timestamps_keep_milliseconds_and_compare_exactly() -> None:
    moment = datetime(2026, 3, 2, 14, 30, 0, 123456, tzinfo=UTC)
    assert stamp(moment) == "2026-03-02T14:30:00.123Z"
    assert millis(stamp(moment)) == millis("1772461800123") == 1772461800123
    assert millis("2026-03-02T14:30:00Z") == 1772461800000
    assert millis(None) is None


def test_a_hubspot_time_out_of_any_range_is_no_time() -> None:
    # The journal's occurredAt read as epoch milliseconds: one past year 9999 failed the
    # whole poll (fromtimestamp raised), and a float or an ISO string read differently
    # from the engagements' times.
    assert moment("1772461800123") == datetime(2026, 3, 2, 14, 30, 0, 123000, tzinfo=UTC)
    assert moment(1772461800123) == moment(1772461800123.0) == moment("2026-03-02T14:30:00.123Z")
    assert moment(" 1772461800123 ") == moment("1772461800123")
    nonsense_values = ("99999999999999999999", -(10**15), float("nan"), float("inf"), True, "x")
    # A doubled sign passed the digits check and made int() raise; other scripts' digits
    # were read as a time.
    for nonsense in (*nonsense_values, "\u0663\u0663", "--5", "-"):
        assert moment(nonsense) is None
    assert millis("soon") is None


def test_bodies_are_escaped_and_fit_hubspot() -> None:
    body = engagement_body("AI receptionist text", "<b>hi</b>", "line 1\nline 2")
    assert body == "AI receptionist text<br><br>&lt;b&gt;hi&lt;/b&gt;<br><br>line 1<br>line 2"
    long = engagement_body(None, "s" * 70_000, "t" * 70_000)
    assert len(long) <= MAX_TEXT
    assert long.startswith("sss")
    assert long.endswith("(truncated)")


def test_the_reason_names_the_property_not_the_value() -> None:
    error = HubSpotValidationError(
        "POST /crm/v3/objects/contacts/batch/create: HubSpot refused the request",
        status_code=400,
        category="VALIDATION_ERROR",
        detail='Property values were not valid: [{"isValid"'
        ':false,"message":"Secret summary was not one of the allowed options: [a, b]","error":'
        '"INVALID_OPTION","name":"call_outcome","localizedErrorMessage":"..."},{"isValid":false,'
        '"message":"x","error":"WEIRD","name":"ai_lead_score"}]',
    )
    assert [(p.name, p.code) for p in property_errors(error)] == [
        ("call_outcome", "INVALID_OPTION"),
        ("ai_lead_score", "WEIRD"),
    ]
    reason = reason_of(error)
    assert reason == (
        "HubSpot rejected the record: call_outcome is not one of the property's options; "
        "ai_lead_score was refused (WEIRD)"
    )
    assert "Secret" not in reason
    other = HubSpotValidationError(
        "POST x: refused", status_code=400, category="VALIDATION_ERROR", detail="Secret"
    )
    assert reason_of(other) == "HubSpot rejected the record: VALIDATION_ERROR 400"
