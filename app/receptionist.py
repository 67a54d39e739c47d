"""The receptionist event: its two accepted forms, validated into one normalized event.

The nested form is DESIGN.md's (`id`, `type`, `caller: {name, phone, email}`, `summary`, …);
the flat post-call form (`call_id`, `caller_name`, `caller_phone`, `caller_email`,
`call_summary`, …) is always a `call.completed`. Both become a `ReceptionistEvent`,
whose JSON is the inbox payload the receptionist handlers read:

    id, type, occurred_at (ISO 8601, UTC), form ("nested" | "flat"),
    caller: {name, phone (as given), phone_e164, email (normalized)},
    summary, transcript, duration_seconds, outcome, appointment_booked, lead_score,
    follow_up_required, campaign_id, recording_url

A caller needs a phone or an email that Hubline can read (a `test.ping` needs no
caller). Ids and phone numbers sent as JSON numbers are read as text; a duration or lead
score must be a finite number (or a string of one), never true or false; a duration is
at most a day. `occurred_at` must lie between 2000 and a day after receipt. The flat form
may carry `type` only as `call.completed`. A `recording_url` that is not an https
address is left out, not refused (the answer lists it under `ignored`), and so is a
phone Hubline cannot read when the caller's email names them. Unknown fields
are ignored: platforms add fields, and refusing them would lose calls.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)
from pydantic_core import PydanticCustomError

from app.errors import EventRejected
from app.identity import normalize_email, normalize_phone

EventType = Literal["call.completed", "text.received", "chat.completed", "test.ping"]
PING = "test.ping"
FLAT_FIELDS = frozenset({"call_id", "caller_name", "caller_phone", "caller_email", "call_summary"})
MAX_AHEAD = timedelta(days=1)
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
MAX_DURATION_SECONDS = 86_400  # a day: longer is a unit mistake (milliseconds) or garbage
NOT_AN_HTTPS_ADDRESS = (
    "is not an https URL (HubSpot takes only secure recording links): the call is stored without it"
)
NOT_A_PHONE_NUMBER = (
    "is not a phone number Hubline can read (a number without its area code, or in an "
    "unknown format): the event is stored with the caller's email alone"
)
FAR_AHEAD = (
    "is more than a day after Hubline received the event: check the sender's clock and "
    "time zone (a time without an offset is read as UTC)"
)
TOO_EARLY = "is before 2000: check the sender's clock and date format (the year needs four digits)"
FLAT_IS_A_CALL = (
    "the flat form (call_id, caller_phone, …) is always a call.completed: send other "
    "events in the nested form (type, caller: {…})"
)

_Text = Field(default=None, max_length=256)


def _not_a_bool(value: Any) -> Any:
    # Python counts JSON's true and false as the integers 1 and 0; a sender does not.
    if isinstance(value, bool):
        raise PydanticCustomError("float_type", "Input should be a number, not true or false")
    return value


_Number = Annotated[float, BeforeValidator(_not_a_bool)]


def _no_control_characters(value: str) -> str:
    # A campaign id is kept as text outside the encrypted payload (the campaign's state)
    # and names a HubSpot marketing event: PostgreSQL's text refuses a NUL, which would
    # fail the stored event at every attempt. (Lone surrogates pydantic refuses itself.)
    if any(unicodedata.category(char) == "Cc" for char in value):
        raise PydanticCustomError("control_characters", "must not contain control characters")
    return value


# The length first: the characters of a value past it are not looked at.
_Identifier = Annotated[
    str, StringConstraints(max_length=256), AfterValidator(_no_control_characters)
]


def is_https_address(value: str) -> bool:
    """True for an https URL with a host: the only recording link HubSpot takes."""
    try:
        parts = urlsplit(value)
        return parts.scheme.lower() == "https" and bool(parts.hostname)
    except ValueError:  # "http://[abc": an IPv6 address left open
        return False


# Platforms send ids (and sometimes phone numbers) as JSON numbers: they are read as text.
_INPUT_CONFIG = ConfigDict(extra="ignore", str_strip_whitespace=True, coerce_numbers_to_str=True)


class _Input(BaseModel):
    model_config = _INPUT_CONFIG

    occurred_at: datetime | None = None
    transcript: str | None = None
    # NaN and Infinity (which Python's JSON reader takes) are no duration or score.
    duration_seconds: _Number | None = Field(
        default=None, ge=0, le=MAX_DURATION_SECONDS, allow_inf_nan=False
    )
    outcome: str | None = Field(default=None, max_length=128)
    appointment_booked: bool | None = None
    lead_score: _Number | None = Field(default=None, allow_inf_nan=False)
    follow_up_required: bool | None = None
    campaign_id: _Identifier | None = None
    recording_url: str | None = Field(default=None, max_length=2048)


class CallerInput(BaseModel):
    model_config = _INPUT_CONFIG

    name: str | None = _Text
    phone: str | None = Field(default=None, max_length=64)
    email: str | None = Field(default=None, max_length=320)


class NestedInput(_Input):
    """DESIGN.md's receptionist event."""

    id: str | None = _Text
    type: EventType
    caller: CallerInput | None = None
    summary: str | None = None


class FlatInput(_Input):
    """The flat post-call form receptionist platforms commonly send."""

    call_id: str | None = _Text
    caller_name: str | None = _Text
    caller_phone: str | None = Field(default=None, max_length=64)
    caller_email: str | None = Field(default=None, max_length=320)
    call_summary: str | None = None


class Caller(BaseModel):
    name: str | None = None
    phone: str | None = None
    phone_e164: str | None = None
    email: str | None = None


class ReceptionistEvent(BaseModel):
    """One receptionist event, whichever form it came in."""

    id: str
    type: EventType
    occurred_at: datetime
    # False: the sender gave no time, and `occurred_at` is when Hubline received it.
    occurred_at_given: bool = False
    form: Literal["nested", "flat"]
    caller: Caller
    summary: str | None = None
    transcript: str | None = None
    duration_seconds: float | None = None
    outcome: str | None = None
    appointment_booked: bool | None = None
    lead_score: float | None = None
    follow_up_required: bool | None = None
    campaign_id: str | None = None
    recording_url: str | None = None
    # Fields left out rather than refuse the call, told to the sender; not in the payload.
    ignored: list[dict[str, str]] = Field(default_factory=list, exclude=True)

    def payload(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _form(data: dict[str, Any]) -> Literal["nested", "flat", "mixed"]:
    """Which form an event is in ("mixed": the flat form's caller fields with another type)."""
    if "caller" in data or FLAT_FIELDS.isdisjoint(data):
        return "nested"
    # A platform may add `type: call.completed` to the flat form.
    event_type = data.get("type", "call.completed")
    if event_type == "call.completed":
        return "flat"
    return "nested" if event_type == PING else "mixed"


def parse_event(
    data: Any, *, webhook_id: str | None, region: str, received_at: datetime
) -> ReceptionistEvent:
    """Validate a parsed JSON body; raises EventRejected listing every field problem."""
    if not isinstance(data, dict):
        raise EventRejected([{"field": "", "message": "the event must be a JSON object"}])
    form = _form(data)
    if form == "mixed":
        # Read as the nested form, it would be refused for fields it does have.
        raise EventRejected([{"field": "type", "message": FLAT_IS_A_CALL}])
    flat = form == "flat"
    model: type[NestedInput] | type[FlatInput] = FlatInput if flat else NestedInput
    try:
        given: NestedInput | FlatInput | None = model.model_validate(data)
    except ValidationError as error:
        given, problems = None, _problems(error)
    else:
        problems = []

    # Who called and which event this is are checked even when other fields failed, so
    # one answer lists everything the sender must fix.
    shape = _FLAT if flat else _NESTED
    caller = _caller(given, data, flat)
    event_type = "call.completed" if flat else data.get("type")
    event_id = _text(given, data, shape.id) or (webhook_id or "").strip() or None
    if event_id is None:
        problems.append(
            {"field": shape.id, "message": "is required (or a webhook-id header) to identify it"}
        )
    phone_e164 = normalize_phone(caller.phone, region)
    email = normalize_email(caller.email)
    if event_type != PING and phone_e164 is None and email is None:
        if caller.phone:
            problems.append({"field": shape.phone, "message": "is not a phone number"})
        if caller.email:
            problems.append({"field": shape.email, "message": "is not an email address"})
        if not caller.phone and not caller.email:
            problems.append({"field": shape.caller, "message": "needs a phone or an email"})
    occurred_at = (given.occurred_at if given is not None else None) or received_at
    if occurred_at.tzinfo is None:
        occurred_at = occurred_at.replace(tzinfo=UTC)
    try:
        occurred_at = occurred_at.astimezone(UTC)
    except OverflowError:  # year 1 an hour east of UTC, year 9999 west of it
        problems.append({"field": "occurred_at", "message": "is not a time Hubline can read"})
        occurred_at = received_at
    if occurred_at - received_at > MAX_AHEAD:
        # A contact's AI properties follow its newest event: one dated ahead (a typo, a
        # wrong clock) would keep every real event after it from updating them.
        problems.append({"field": "occurred_at", "message": FAR_AHEAD})
    elif occurred_at < EARLIEST:
        # A year typo ("0202") or an epoch of 0: no receptionist call is that old, and
        # HubSpot's timestamps are not made for it.
        problems.append({"field": "occurred_at", "message": TOO_EARLY})
    if problems or given is None:
        raise EventRejected(_unique(problems))
    assert event_id is not None

    ignored: list[dict[str, str]] = []
    if caller.phone and phone_e164 is None:
        # The email names the caller: the call is kept, and the sender told why the
        # number is missing from the contact and the call.
        ignored.append({"field": shape.phone, "message": NOT_A_PHONE_NUMBER})
    recording_url = given.recording_url
    if recording_url and not is_https_address(recording_url):
        # HubSpot shows the recording as a link and takes only an https one ("Only HTTPS,
        # secure URLs will be accepted"): sent another, the whole call would be refused.
        # The call matters more than its link, so it is stored without it.
        ignored.append({"field": "recording_url", "message": NOT_AN_HTTPS_ADDRESS})
        recording_url = None
    return ReceptionistEvent(
        id=event_id,
        type="call.completed" if isinstance(given, FlatInput) else given.type,
        occurred_at=occurred_at,
        occurred_at_given=given.occurred_at is not None,
        form="flat" if flat else "nested",
        caller=Caller(name=caller.name, phone=caller.phone, phone_e164=phone_e164, email=email),
        summary=given.call_summary if isinstance(given, FlatInput) else given.summary,
        transcript=given.transcript,
        duration_seconds=given.duration_seconds,
        outcome=given.outcome,
        appointment_booked=given.appointment_booked,
        lead_score=given.lead_score,
        follow_up_required=given.follow_up_required,
        campaign_id=given.campaign_id,
        recording_url=recording_url,
        ignored=ignored,
    )


@dataclass(frozen=True)
class _Shape:
    """Where each form keeps the event id and the caller's details (for field errors)."""

    id: str
    caller: str
    phone: str
    email: str


_NESTED = _Shape(id="id", caller="caller", phone="caller.phone", email="caller.email")
_FLAT = _Shape(id="call_id", caller="caller_phone", phone="caller_phone", email="caller_email")


def _caller(given: NestedInput | FlatInput | None, data: dict[str, Any], flat: bool) -> CallerInput:
    if isinstance(given, FlatInput):
        return CallerInput(
            name=given.caller_name, phone=given.caller_phone, email=given.caller_email
        )
    if isinstance(given, NestedInput):
        return given.caller or CallerInput()
    # The event failed validation: read what can be read, to report on it.
    source = data if flat else data.get("caller")
    if not isinstance(source, dict):
        return CallerInput()
    prefix = "caller_" if flat else ""
    # Unvalidated: a value past its length limit has its problem already, and validating
    # it here again would raise out of the route (a 500, the value in the log).
    return CallerInput.model_construct(
        phone=_raw_text(source.get(prefix + "phone")),
        email=_raw_text(source.get(prefix + "email")),
    )


def _text(given: NestedInput | FlatInput | None, data: dict[str, Any], name: str) -> str | None:
    value = getattr(given, name) if given is not None else _raw_text(data.get(name))
    return value or None


def _raw_text(value: Any) -> str | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # as the models read numbers given for text
    return value.strip() or None if isinstance(value, str) else None


def _unique(problems: list[dict[str, str]]) -> list[dict[str, str]]:
    """One problem per field: a schema error already says what is wrong with it."""
    seen: set[str] = set()
    unique = []
    for problem in problems:
        if problem["field"] not in seen:
            seen.add(problem["field"])
            unique.append(problem)
    return unique


def _problems(error: ValidationError) -> list[dict[str, str]]:
    return [
        {"field": ".".join(str(part) for part in item["loc"]), "message": item["msg"]}
        for item in error.errors(include_url=False, include_input=False)
    ]
