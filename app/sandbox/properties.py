"""Property definitions: HubSpot's defaults per object type, value validation, calculated phones."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import phonenumbers

from app.sandbox.errors import validation_error

OBJECT_TYPES = ("contacts", "calls", "notes")

# Accept HubSpot's object type ids as aliases of the names.
OBJECT_TYPE_ALIASES = {
    "contact": "contacts",
    "0-1": "contacts",
    "call": "calls",
    "0-48": "calls",
    "note": "notes",
    "0-46": "notes",
}

PROPERTY_TYPES: dict[str, frozenset[str]] = {
    "string": frozenset({"text", "textarea", "phonenumber", "html", "file"}),
    "number": frozenset({"number"}),
    "enumeration": frozenset({"select", "radio", "checkbox", "booleancheckbox"}),
    "bool": frozenset({"booleancheckbox"}),
    "datetime": frozenset({"date"}),
    "date": frozenset({"date"}),
}

CALCULATED_PHONES = {
    "phone": (
        "hs_searchable_calculated_phone_number",
        "hs_searchable_calculated_international_phone_number",
    ),
    "mobilephone": (
        "hs_searchable_calculated_mobile_number",
        "hs_searchable_calculated_international_mobile_number",
    ),
}

# What a read returns when the request names no properties.
DEFAULT_READ_PROPERTIES = {
    "contacts": (
        "createdate",
        "email",
        "firstname",
        "hs_object_id",
        "lastmodifieddate",
        "lastname",
    ),
    "calls": ("hs_createdate", "hs_lastmodifieddate", "hs_object_id"),
    "notes": ("hs_createdate", "hs_lastmodifieddate", "hs_object_id"),
}

EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
PROPERTY_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
MAX_STRING_LENGTH = 65536


@dataclass
class PropertyGroup:
    """A property group (a heading in HubSpot's record sidebar)."""

    name: str
    label: str
    display_order: int = -1
    archived: bool = False

    def to_json(self) -> dict[str, Any]:
        """HubSpot's JSON for a group."""
        return {
            "name": self.name,
            "label": self.label,
            "displayOrder": self.display_order,
            "archived": self.archived,
        }


@dataclass
class PropertyDef:
    """One property definition on an object type."""

    name: str
    label: str
    type: str
    field_type: str
    group_name: str
    description: str = ""
    options: list[dict[str, Any]] = field(default_factory=list)
    display_order: int = -1
    has_unique_value: bool = False
    hidden: bool = False
    form_field: bool = True
    hubspot_defined: bool = False
    read_only_value: bool = False
    calculated: bool = False
    created_at: float = 0.0
    updated_at: float = 0.0

    def option_values(self) -> list[str]:
        """The allowed values of an enumeration."""
        return [str(o["value"]) for o in self.options]

    def to_json(self) -> dict[str, Any]:
        """HubSpot's JSON for a property."""
        return {
            "name": self.name,
            "label": self.label,
            "type": self.type,
            "fieldType": self.field_type,
            "description": self.description,
            "groupName": self.group_name,
            "options": [dict(o) for o in self.options],
            "displayOrder": self.display_order,
            "calculated": self.calculated,
            "externalOptions": False,
            "hasUniqueValue": self.has_unique_value,
            "hidden": self.hidden,
            "hubspotDefined": self.hubspot_defined,
            "modificationMetadata": {
                "archivable": not self.hubspot_defined,
                "readOnlyDefinition": self.hubspot_defined,
                "readOnlyValue": self.read_only_value,
            },
            "formField": self.form_field,
            "createdAt": iso(self.created_at),
            "updatedAt": iso(self.updated_at),
            "archived": False,
        }


def iso(ts: float) -> str:
    """Epoch seconds as HubSpot's ISO 8601 timestamps (UTC, milliseconds)."""
    # isoformat, not strftime: %Y leaves years before 1000 unpadded ("202-03-02…").
    moment = datetime.fromtimestamp(ts, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def options(*values: str) -> list[dict[str, Any]]:
    """Enumeration options whose labels are their values."""
    return [
        {"label": v, "value": v, "displayOrder": i, "hidden": False, "description": ""}
        for i, v in enumerate(values)
    ]


BOOL_OPTIONS = [
    {"label": "Yes", "value": "true", "displayOrder": 0, "hidden": False, "description": ""},
    {"label": "No", "value": "false", "displayOrder": 1, "hidden": False, "description": ""},
]


def _p(
    name: str, label: str, type_: str, field_type: str, group: str, **kwargs: Any
) -> PropertyDef:
    return PropertyDef(name, label, type_, field_type, group, hubspot_defined=True, **kwargs)


def _read_only(name: str, label: str, type_: str, field_type: str, group: str) -> PropertyDef:
    return _p(name, label, type_, field_type, group, read_only_value=True, calculated=True)


def _contact_properties() -> list[PropertyDef]:
    info = "contactinformation"
    return [
        _p("email", "Email", "string", "text", info),
        _p("firstname", "First Name", "string", "text", info),
        _p("lastname", "Last Name", "string", "text", info),
        _p("phone", "Phone Number", "string", "phonenumber", info),
        _p("mobilephone", "Mobile Phone Number", "string", "phonenumber", info),
        _p("company", "Company Name", "string", "text", info),
        _p("jobtitle", "Job Title", "string", "text", info),
        _p("website", "Website URL", "string", "text", info),
        _p("address", "Street Address", "string", "text", info),
        _p("city", "City", "string", "text", info),
        _p("state", "State/Region", "string", "text", info),
        _p("zip", "Postal Code", "string", "text", info),
        _p("country", "Country/Region", "string", "text", info),
        _p(
            "lifecyclestage",
            "Lifecycle Stage",
            "enumeration",
            "radio",
            info,
            options=options(
                "subscriber",
                "lead",
                "marketingqualifiedlead",
                "salesqualifiedlead",
                "opportunity",
                "customer",
                "evangelist",
                "other",
            ),
        ),
        _p(
            "hs_lead_status",
            "Lead Status",
            "enumeration",
            "radio",
            "sales_properties",
            options=options(
                "NEW",
                "OPEN",
                "IN_PROGRESS",
                "OPEN_DEAL",
                "UNQUALIFIED",
                "ATTEMPTED_TO_CONTACT",
                "CONNECTED",
                "BAD_TIMING",
            ),
        ),
        _read_only("createdate", "Create Date", "datetime", "date", info),
        _read_only("lastmodifieddate", "Last Modified Date", "datetime", "date", info),
        _read_only("hs_object_id", "Record ID", "number", "number", info),
        _read_only("hs_merged_object_ids", "Merged Record IDs", "string", "text", info),
        *(
            _read_only(name, name.replace("_", " ").title(), "string", "text", info)
            for pair in CALCULATED_PHONES.values()
            for name in pair
        ),
    ]


def _engagement_properties(object_type: str) -> list[PropertyDef]:
    group = "engagement"
    common = [
        _p("hs_timestamp", "Activity date", "datetime", "date", group),
        _read_only("hs_createdate", "Create date", "datetime", "date", group),
        _read_only("hs_lastmodifieddate", "Last modified date", "datetime", "date", group),
        _read_only("hs_object_id", "Record ID", "number", "number", group),
    ]
    if object_type == "notes":
        return [
            *common,
            _p("hs_note_body", "Note body", "string", "html", group),
            _p("hs_attachment_ids", "Attached file IDs", "string", "text", group),
        ]
    return [
        *common,
        _p("hs_call_title", "Call Title", "string", "text", group),
        _p("hs_call_body", "Call notes", "string", "html", group),
        _p("hs_call_duration", "Call duration", "number", "number", group),
        _p(
            "hs_call_direction",
            "Call direction",
            "enumeration",
            "select",
            group,
            options=options("INBOUND", "OUTBOUND"),
        ),
        _p(
            "hs_call_status",
            "Call status",
            "enumeration",
            "select",
            group,
            options=options(
                "BUSY",
                "CALLING_CRM_USER",
                "CANCELED",
                "COMPLETED",
                "CONNECTING",
                "FAILED",
                "IN_PROGRESS",
                "MISSED",
                "NO_ANSWER",
                "QUEUED",
                "RINGING",
            ),
        ),
        _p("hs_call_from_number", "From number", "string", "text", group),
        _p("hs_call_to_number", "To number", "string", "text", group),
        _p("hs_call_recording_url", "Recording URL", "string", "text", group),
        _p("hs_call_disposition", "Call outcome", "string", "text", group),
    ]


def default_properties(object_type: str, now: float) -> dict[str, PropertyDef]:
    """HubSpot's built-in properties for an object type."""
    defs = (
        _contact_properties() if object_type == "contacts" else _engagement_properties(object_type)
    )
    for i, prop in enumerate(defs):
        prop.display_order = i
        prop.created_at = prop.updated_at = now
    return {p.name: p for p in defs}


def default_groups(object_type: str) -> dict[str, PropertyGroup]:
    """HubSpot's built-in property groups for an object type."""
    if object_type == "contacts":
        groups = [
            PropertyGroup("contactinformation", "Contact information", 0),
            PropertyGroup("conversioninformation", "Conversion information", 1),
            PropertyGroup("sales_properties", "Sales properties", 2),
        ]
    else:
        groups = [PropertyGroup("engagement", "Engagement properties", 0)]
    return {g.name: g for g in groups}


def calculated_phone(raw: str) -> tuple[str, str]:
    """The (national, international) digit strings HubSpot keeps for searching a typed phone.

    The rule: parse with region US; when the number is possible, the national part is its
    national number's digits and the international part is country code + national number.
    Otherwise strip non-digits, and drop a leading country code 1 from an 11-digit NANP number.
    """
    if not raw.strip():
        return "", ""
    try:
        parsed = phonenumbers.parse(raw, "US")
    except phonenumbers.NumberParseException:
        parsed = None
    if parsed is not None and phonenumbers.is_possible_number(parsed):
        national = str(parsed.national_number)
        return national, f"{parsed.country_code}{national}"
    digits = re.sub(r"\D", "", raw)
    if len(digits) == 11 and digits.startswith("1"):
        return digits[1:], digits
    return digits, digits


def _number(text: str) -> str | None:
    try:
        value = float(text)
    except ValueError:
        return None
    if value != value or value in (float("inf"), float("-inf")):
        return None
    return str(int(value)) if value.is_integer() and "e" not in text.lower() else text


def parse_datetime_ms(text: str) -> int | None:
    """Epoch milliseconds from HubSpot's accepted datetime inputs (epoch ms or ISO 8601)."""
    text = text.strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def normalize_value(prop: PropertyDef, raw: object) -> tuple[str, str | None]:
    """The stored string for a written value, or ("", error code) when HubSpot would reject it."""
    if raw is None:
        return "", None
    if isinstance(raw, bool):
        text = "true" if raw else "false"
    elif isinstance(raw, int | float):
        text = repr(raw) if isinstance(raw, float) else str(raw)
    elif isinstance(raw, str):
        text = raw
    else:
        return "", "INVALID_TYPE"
    if text == "":
        return "", None  # an empty string clears a property of any type
    if prop.type == "string":
        if len(text) > MAX_STRING_LENGTH:
            return "", "TOO_LONG"
        if prop.name == "email":
            # HubSpot stores contact emails lower-cased.
            return (
                (text.strip().lower(), None)
                if EMAIL_RE.match(text.strip())
                else ("", "INVALID_EMAIL")
            )
        if prop.name == "hs_call_recording_url" and not text.lower().startswith("https://"):
            # HubSpot's calls guide: "Only HTTPS, secure URLs will be accepted."
            return "", "INVALID_URL"
        return text, None
    if prop.type == "number":
        number = _number(text.strip())
        return (number, None) if number is not None else ("", "INVALID_NUMBER")
    if prop.type == "bool":
        lowered = text.strip().lower()
        return (lowered, None) if lowered in ("true", "false") else ("", "INVALID_BOOLEAN")
    if prop.type in ("datetime", "date"):
        ms = parse_datetime_ms(text)
        if ms is None:
            return "", "INVALID_DATE"
        if prop.type == "date":
            return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d"), None
        return iso(ms / 1000), None
    if prop.type == "enumeration":
        allowed = prop.option_values()
        chosen = text.split(";") if prop.field_type == "checkbox" else [text]
        if prop.field_type == "booleancheckbox":
            chosen = [c.lower() for c in chosen]
        if all(c in allowed for c in chosen):
            return ";".join(chosen), None
        return "", "INVALID_OPTION"
    return text, None


def error_message(prop_name: str, code: str, raw: object, prop: PropertyDef | None) -> str:
    """HubSpot-style wording for a property value error."""
    if code == "PROPERTY_DOESNT_EXIST":
        return f'Property "{prop_name}" does not exist'
    if code == "INVALID_OPTION" and prop is not None:
        return f"{raw!s} was not one of the allowed options: {prop.option_values()}"
    if code == "READ_ONLY_VALUE":
        return f"{prop_name} is a read only property; its value cannot be set."
    if code == "INVALID_EMAIL":
        return f"Email address {raw!s} is invalid"
    return f"{raw!s} is not a valid value for property {prop_name} ({code})"


def validate_definition(
    body: dict[str, Any], groups: dict[str, PropertyGroup], *, partial: bool = False
) -> None:
    """Reject a property definition HubSpot would reject (400)."""
    required = () if partial else ("name", "label", "type", "fieldType", "groupName")
    missing = [k for k in required if not body.get(k)]
    if missing:
        raise validation_error(f"Missing required fields: {', '.join(missing)}")
    name = body.get("name")
    if name is not None and not partial and not PROPERTY_NAME_RE.match(str(name)):
        raise validation_error(f"Property name {name!r} must be lower case letters, digits or _")
    type_ = body.get("type")
    field_type = body.get("fieldType")
    if type_ is not None and type_ not in PROPERTY_TYPES:
        raise validation_error(f"Unknown property type {type_!r}")
    if type_ is not None and field_type is not None and field_type not in PROPERTY_TYPES[type_]:
        raise validation_error(f"fieldType {field_type!r} is not valid for type {type_!r}")
    group = body.get("groupName")
    if group is not None and group not in groups:
        raise validation_error(f"Property group {group!r} does not exist")
    opts = body.get("options")
    if opts is not None:
        if not isinstance(opts, list) or not all(
            isinstance(o, dict) and o.get("label") not in (None, "") and o.get("value") is not None
            for o in opts
        ):
            raise validation_error("Each option needs a label and a value")
        values = [str(o["value"]) for o in opts]
        if len(values) != len(set(values)):
            raise validation_error("Option values must be unique")
    if body.get("hasUniqueValue") and type_ not in (None, "string", "number"):
        raise validation_error("Only string and number properties can have unique values")


def clean_options(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Options in HubSpot's full shape."""
    return [
        {
            "label": str(o["label"]),
            "value": str(o["value"]),
            "displayOrder": int(o.get("displayOrder", i)),
            "hidden": bool(o.get("hidden", False)),
            "description": str(o.get("description", "")),
        }
        for i, o in enumerate(raw)
    ]
