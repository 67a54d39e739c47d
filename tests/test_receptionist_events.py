"""The receptionist event: nested and flat forms validate into one normalized event."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.errors import EventRejected
from app.receptionist import (
    FAR_AHEAD,
    FLAT_FIELDS,
    FLAT_IS_A_CALL,
    NOT_A_PHONE_NUMBER,
    NOT_AN_HTTPS_ADDRESS,
    TOO_EARLY,
    ReceptionistEvent,
    parse_event,
)
from tests.webhook_support import call_event

RECEIVED = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)
ADA_PHONE = "+14155550100"


def parse(data: Any, *, webhook_id: str | None = None, region: str = "US") -> ReceptionistEvent:
    return parse_event(data, webhook_id=webhook_id, region=region, received_at=RECEIVED)


def problems(data: Any, **kwargs: Any) -> list[dict[str, str]]:
    with pytest.raises(EventRejected) as raised:
        parse(data, **kwargs)
    return raised.value.problems


def test_nested_event_is_normalized() -> None:
    event = parse(
        call_event(caller={"name": " Ada ", "phone": "(415) 555-0100", "email": "Ada@Example.COM"})
    )
    payload = event.payload()
    assert payload["id"] == "evt_01"
    assert payload["type"] == "call.completed"
    assert payload["form"] == "nested"
    assert payload["occurred_at"] == "2026-03-02T14:30:00Z"
    assert payload["caller"] == {
        "name": "Ada",
        "phone": "(415) 555-0100",
        "phone_e164": "+14155550100",
        "email": "ada@example.com",
    }
    assert payload["summary"] == "Wants a cleaning appointment next week"
    assert payload["duration_seconds"] == 480
    assert payload["appointment_booked"] is True
    assert payload["lead_score"] == 82
    assert payload["campaign_id"] == "google-ads-spring"


def test_flat_post_call_form_becomes_a_completed_call() -> None:
    event = parse(
        {
            "call_id": "call-9",
            "caller_name": "Grace Hopper",
            "caller_phone": "415 555 0199",
            "caller_email": "grace@example.com",
            "call_summary": "Asked about prices",
            "appointment_booked": False,
            "some_platform_field": {"ignored": True},
        }
    )
    assert event.id == "call-9"
    assert event.type == "call.completed"
    assert event.form == "flat"
    assert event.caller.name == "Grace Hopper"
    assert event.caller.phone_e164 == "+14155550199"
    assert event.caller.email == "grace@example.com"
    assert event.summary == "Asked about prices"
    assert event.appointment_booked is False
    assert event.occurred_at == RECEIVED


def test_a_number_without_country_code_is_read_in_the_portal_region() -> None:
    event = parse(call_event(caller={"phone": "020 7946 0018"}), region="GB")
    assert event.caller.phone_e164 == "+442079460018"


def test_an_email_alone_identifies_the_caller() -> None:
    event = parse(call_event(caller={"email": "ada@example.com"}))
    assert event.caller.phone_e164 is None
    assert event.caller.email == "ada@example.com"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            call_event(caller={"name": "Ada"}),
            [{"field": "caller", "message": "needs a phone or an email"}],
        ),
        (call_event(caller=None), [{"field": "caller", "message": "needs a phone or an email"}]),
        (
            call_event(caller={"phone": "call me maybe"}),
            [{"field": "caller.phone", "message": "is not a phone number"}],
        ),
        (
            call_event(caller={"email": "not-an-email"}),
            [{"field": "caller.email", "message": "is not an email address"}],
        ),
        (
            {"call_id": "c1", "caller_name": "Ada"},
            [{"field": "caller_phone", "message": "needs a phone or an email"}],
        ),
    ],
)
def test_a_caller_needs_a_phone_or_an_email(data: Any, expected: list[dict[str, str]]) -> None:
    assert problems(data) == expected


LONG_TEXT = "Zebulon Quixotic lives at 12 Elm Street, Springfield " * 8


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (call_event(caller={"phone": LONG_TEXT}), "caller.phone"),
        (call_event(caller={"email": LONG_TEXT * 2}), "caller.email"),
        ({"call_id": "c1", "caller_phone": LONG_TEXT}, "caller_phone"),
        ({"call_id": "c1", "caller_email": LONG_TEXT * 2}, "caller_email"),
    ],
)
def test_a_phone_or_email_past_its_length_limit_is_a_field_problem(data: Any, field: str) -> None:
    """Not a crash: the caller's details are read again, for the answer, after the event
    failed validation, and that reading must not validate them a second time."""
    found = problems(data)
    assert [problem["field"] for problem in found] == [field]
    assert "at most" in found[0]["message"]
    assert "Zebulon" not in repr(found)


@pytest.mark.parametrize("campaign", ["spring\x00ads", "spring\nads", "spring\ud800"])
def test_a_campaign_id_with_a_control_character_or_lone_surrogate_is_refused(
    campaign: str,
) -> None:
    """A campaign id is kept as text outside the encrypted payload and names a HubSpot
    marketing event: accepted, a NUL (which PostgreSQL's text refuses) or a lone
    surrogate (which nothing encodes) failed the stored call at every attempt."""
    found = problems(call_event(campaign_id=campaign))
    assert [problem["field"] for problem in found] == ["campaign_id"]
    assert parse(call_event(campaign_id="spring ads — 2026")).campaign_id == "spring ads — 2026"
    # Past its length, a campaign id is refused as any text field is.
    [too_long] = problems(call_event(campaign_id="x" * 257))
    assert too_long == {
        "field": "campaign_id",
        "message": "String should have at most 256 characters",
    }


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (call_event(id="evt\ud800"), "id"),
        (call_event(summary="call back\ud800"), "summary"),
        (call_event(outcome="Booked\ud800"), "outcome"),
        (call_event(transcript="hello\udfff"), "transcript"),
        (call_event(caller={"phone": ADA_PHONE, "name": "Ada\ud800"}), "caller.name"),
        ({"call_id": "c1", "caller_phone": ADA_PHONE, "call_summary": "x\ud800"}, "call_summary"),
    ],
)
def test_a_lone_surrogate_in_any_text_is_a_field_problem(data: Any, field: str) -> None:
    """Valid JSON ("\\ud800") but no character: nothing can encode it, in the event's keyed
    hash or in the JSON sent to HubSpot (pydantic refuses it from 2.14 on, pyproject.toml)."""
    assert [problem["field"] for problem in problems(data)] == [field]


def test_field_errors_name_each_bad_field() -> None:
    found = problems(
        call_event(type="call.started", duration_seconds=-1, appointment_booked="perhaps")
    )
    fields = {problem["field"] for problem in found}
    assert fields == {"type", "duration_seconds", "appointment_booked"}
    assert all(problem["message"] for problem in found)


def test_a_missing_type_is_a_field_error() -> None:
    event = call_event()
    del event["type"]
    assert [p["field"] for p in problems(event)] == ["type"]


@pytest.mark.parametrize("data", [[], "call", 42, None])
def test_an_event_must_be_an_object(data: Any) -> None:
    assert problems(data) == [{"field": "", "message": "the event must be a JSON object"}]


def test_the_webhook_id_header_identifies_an_event_without_id() -> None:
    event = call_event()
    del event["id"]
    assert parse(event, webhook_id="msg_7").id == "msg_7"
    assert parse(call_event(), webhook_id="msg_7").id == "evt_01"
    assert problems(event) == [
        {"field": "id", "message": "is required (or a webhook-id header) to identify it"}
    ]


def test_a_ping_needs_no_caller() -> None:
    event = parse({"id": "ping-1", "type": "test.ping"})
    assert event.type == "test.ping"
    assert event.caller.phone is None


def test_occurred_at_without_zone_is_utc() -> None:
    event = parse(call_event(occurred_at="2026-03-02T14:30:00"))
    assert event.occurred_at == datetime(2026, 3, 2, 14, 30, tzinfo=UTC)
    assert (
        parse(call_event(occurred_at="2026-03-02T16:30:00+02:00")).occurred_at == event.occurred_at
    )


def test_ids_and_phones_sent_as_json_numbers_are_read_as_text() -> None:
    flat = parse({"call_id": 777, "caller_phone": 4155550100, "lead_score": 9})
    assert (flat.id, flat.caller.phone_e164) == ("777", "+14155550100")
    assert parse(call_event(id=12345)).id == "12345"
    # Read the same way when another field fails, so the id is not reported missing.
    assert [p["field"] for p in problems(call_event(id=12345, duration_seconds=-1))] == [
        "duration_seconds"
    ]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "NaN", "-Infinity", True, False])
def test_a_score_or_duration_that_is_no_finite_number_is_refused(value: Any) -> None:
    assert [p["field"] for p in problems(call_event(lead_score=value))] == ["lead_score"]
    assert [p["field"] for p in problems(call_event(duration_seconds=value))] == [
        "duration_seconds"
    ]


def test_a_score_given_as_a_numeric_string_is_read() -> None:
    assert parse(call_event(lead_score="82.5")).lead_score == 82.5


def test_the_flat_form_may_say_it_is_a_completed_call() -> None:
    event = parse({"type": "call.completed", "call_id": "mix1", "caller_phone": "+13035550155"})
    assert (event.form, event.id, event.caller.phone_e164) == ("flat", "mix1", "+13035550155")
    # Any other type is refused with what to do, not with fields the flat form does not have.
    assert problems(
        {"type": "text.received", "call_id": "mix2", "caller_phone": "+13035550155"}
    ) == [{"field": "type", "message": FLAT_IS_A_CALL}]
    # A platform's test button may post its flat form as a ping.
    ping = parse({"type": "test.ping", "call_id": "t1"}, webhook_id="msg_1")
    assert (ping.type, ping.id) == ("test.ping", "msg_1")


@pytest.mark.parametrize(
    "address",
    [
        "javascript:alert(1)",
        "ftp://files.example.com/1.mp3",
        "http://recordings.example.com/1.mp3",
        "recordings/1.mp3",
        "https://",
        "http://[abc",
    ],
)
def test_a_recording_that_is_no_https_address_is_left_out_and_said_so(address: str) -> None:
    event = parse(call_event(recording_url=address))
    assert event.recording_url is None
    assert event.ignored == [{"field": "recording_url", "message": NOT_AN_HTTPS_ADDRESS}]
    assert "ignored" not in event.payload()


def test_a_recording_https_address_is_kept_as_given() -> None:
    address = "HTTPS://recordings.example.com/calls/1.mp3?sig=abc"
    assert parse(call_event(recording_url=address)).recording_url == address


@pytest.mark.parametrize("when", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:30:00-01:00"])
def test_a_time_past_what_a_datetime_holds_in_utc_is_refused(when: str) -> None:
    assert problems(call_event(occurred_at=when)) == [
        {"field": "occurred_at", "message": "is not a time Hubline can read"}
    ]


def test_an_event_dated_more_than_a_day_ahead_is_refused() -> None:
    assert problems(call_event(occurred_at="2099-01-01T00:00:00Z")) == [
        {"field": "occurred_at", "message": FAR_AHEAD}
    ]
    # Its sender's clock or time zone a few hours off, it is taken as given.
    ahead = parse(call_event(occurred_at="2026-03-02T23:00:00+00:00"))
    assert ahead.occurred_at.isoformat() == "2026-03-02T23:00:00+00:00"


@pytest.mark.parametrize("when", ["0202-03-02T14:30:00Z", "1970-01-01T00:00:00Z", "1999-12-31"])
def test_an_event_dated_before_2000_is_refused(when: str) -> None:
    # A year typo made HubSpot's answers unreadable, and every retry made another call.
    assert problems(call_event(occurred_at=when)) == [
        {"field": "occurred_at", "message": TOO_EARLY}
    ]
    assert parse(call_event(occurred_at="2000-01-01T00:00:00Z")).occurred_at.year == 2000


def test_a_duration_is_at_most_a_day() -> None:
    assert parse(call_event(duration_seconds=86_400)).duration_seconds == 86_400
    for too_long in (86_401, 1e308, "1e308"):
        [problem] = problems(call_event(duration_seconds=too_long))
        assert problem["field"] == "duration_seconds"
        assert "86400" in problem["message"]


def test_a_number_with_the_00_international_prefix_is_read_in_any_region() -> None:
    event = parse(call_event(caller={"phone": "0044 20 7946 0958"}), region="US")
    assert event.caller.phone_e164 == "+442079460958"
    assert not [i for i in event.ignored if i["field"] == "caller.phone"]


@pytest.mark.parametrize("phone", ["555-0134", "call me"])
def test_an_unreadable_phone_beside_an_email_is_left_out_and_said(phone: str) -> None:
    data = call_event(caller={"phone": phone, "email": "ada@example.com"})
    event = parse(data)
    assert event.caller.phone_e164 is None
    assert event.caller.email == "ada@example.com"
    assert event.ignored == [{"field": "caller.phone", "message": NOT_A_PHONE_NUMBER}]
    # Without the email there is nobody to file the call under.
    assert problems(call_event(caller={"phone": phone})) == [
        {"field": "caller.phone", "message": "is not a phone number"}
    ]


# --- any body at all ------------------------------------------------------------------

_FIELDS = [
    "id",
    "type",
    "occurred_at",
    "caller",
    "summary",
    "transcript",
    "duration_seconds",
    "outcome",
    "appointment_booked",
    "lead_score",
    "follow_up_required",
    "campaign_id",
    "recording_url",
    *sorted(FLAT_FIELDS),
]
_CALLER_FIELDS = ["name", "phone", "email"]
# The caller's details a problem must never quote carry this name (messages list what a
# field may hold, so any other text could be in one by chance).
_MARKED = "Zebulon"
_texts = st.one_of(
    st.text(max_size=80),
    st.builds(
        lambda before, after: before + _MARKED + after, st.text(max_size=70), st.text(max_size=70)
    ),
    # Around and past the length limits (64 for a phone, 320 for an email, 2048 for a link).
    st.text(alphabet="+0123456789 -()", min_size=50, max_size=400),
    st.builds(lambda text, n: text * n, st.text(min_size=1, max_size=9), st.integers(6, 300)),
    st.sampled_from(["call.completed", "text.received", "test.ping", "2026-03-02T14:30:00Z"]),
    st.builds(
        lambda local, n: f"{local}@example.org" * n, st.text(max_size=20), st.integers(1, 40)
    ),
)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    _texts,
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
_callers = st.dictionaries(st.sampled_from(_CALLER_FIELDS), _json, max_size=3)
_events = st.dictionaries(
    st.sampled_from(_FIELDS), st.one_of(_json, _callers), max_size=len(_FIELDS)
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(_events, _json), webhook_id=st.none() | st.text(max_size=20))
def test_any_body_is_an_event_or_a_list_of_problems_that_repeats_nothing_given(
    data: Any, webhook_id: str | None
) -> None:
    """Whatever a sender posts (fields of the right names holding anything), the answer is
    an event or EventRejected: never another exception (a 500), and no problem quotes the
    input (an answer or a log could then carry a caller's details)."""
    try:
        event = parse(data, webhook_id=webhook_id)
    except EventRejected as rejected:
        found = rejected.problems
    else:
        assert event.id
        return
    assert found
    for problem in found:
        assert set(problem) == {"field", "message"}
        assert _MARKED not in problem["message"]
