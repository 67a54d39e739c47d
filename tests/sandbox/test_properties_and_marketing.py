"""The properties API, scope enforcement, and marketing events with attendance."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from app.sandbox.properties import iso
from tests.sandbox.conftest import Sandbox

PROPERTIES = "/crm/v3/properties/contacts"
EVENTS = "/marketing/v3/marketing-events/events"


def outcome_property(**overrides: Any) -> dict[str, Any]:
    return {
        "name": "call_outcome",
        "label": "Call outcome",
        "type": "enumeration",
        "fieldType": "select",
        "groupName": "ai_receptionist",
        "options": [{"label": "Appointment booked", "value": "appointment_booked"}],
        **overrides,
    }


async def make_group(sandbox: Sandbox, headers: dict[str, str]) -> None:
    response = await sandbox.client.post(
        f"{PROPERTIES}/groups",
        json={"name": "ai_receptionist", "label": "AI receptionist"},
        headers=headers,
    )
    assert response.status_code == 201


async def test_contacts_start_with_hubspots_default_properties(sandbox: Sandbox) -> None:
    headers = await sandbox.token()

    response = await sandbox.client.get(PROPERTIES, headers=headers)

    names = {p["name"] for p in response.json()["results"]}
    assert {"firstname", "lastname", "email", "phone", "mobilephone", "company"} <= names
    assert "hs_searchable_calculated_phone_number" in names
    assert "ai_call_summary" not in names
    assert sandbox.state.properties(1001)["phone"].field_type == "phonenumber"


async def test_create_a_group_and_a_property_then_409_on_repeats(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    await make_group(sandbox, headers)

    created = await sandbox.client.post(PROPERTIES, json=outcome_property(), headers=headers)
    again = await sandbox.client.post(PROPERTIES, json=outcome_property(), headers=headers)
    group_again = await sandbox.client.post(
        f"{PROPERTIES}/groups", json={"name": "ai_receptionist", "label": "x"}, headers=headers
    )

    assert created.status_code == 201
    assert created.json()["type"] == "enumeration"
    assert created.json()["options"][0]["value"] == "appointment_booked"
    assert again.status_code == 409
    assert group_again.status_code == 409
    read = await sandbox.client.get(f"{PROPERTIES}/call_outcome", headers=headers)
    assert read.json()["groupName"] == "ai_receptionist"


@pytest.mark.parametrize(
    "overrides",
    [
        {"type": "number", "fieldType": "text"},
        {"type": "bool", "fieldType": "select"},
        {"type": "string", "fieldType": "booleancheckbox"},
        {"groupName": "no_such_group"},
        {"name": "Has Spaces"},
        {"label": ""},
    ],
)
async def test_invalid_definitions_are_400(sandbox: Sandbox, overrides: dict[str, Any]) -> None:
    headers = await sandbox.token()
    await make_group(sandbox, headers)

    response = await sandbox.client.post(
        PROPERTIES, json=outcome_property(**overrides), headers=headers
    )

    assert response.status_code == 400
    assert response.json()["category"] == "VALIDATION_ERROR"


async def test_a_new_option_must_be_added_before_it_is_written(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    await make_group(sandbox, headers)
    await sandbox.client.post(PROPERTIES, json=outcome_property(), headers=headers)
    write = {"properties": {"call_outcome": "message_taken"}}

    rejected = await sandbox.client.post("/crm/v3/objects/contacts", json=write, headers=headers)
    patched = await sandbox.client.patch(
        f"{PROPERTIES}/call_outcome",
        json={
            "options": [
                {"label": "Appointment booked", "value": "appointment_booked"},
                {"label": "Message taken", "value": "message_taken"},
            ]
        },
        headers=headers,
    )
    accepted = await sandbox.client.post("/crm/v3/objects/contacts", json=write, headers=headers)

    assert rejected.status_code == 400
    assert "INVALID_OPTION" in rejected.json()["message"]
    assert patched.status_code == 200
    assert accepted.status_code == 201
    assert accepted.json()["properties"]["call_outcome"] == "message_taken"


async def test_bool_and_number_properties_validate_values(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    await make_group(sandbox, headers)
    for definition in (
        {"name": "follow_up_required", "type": "bool", "fieldType": "booleancheckbox"},
        {"name": "ai_lead_score", "type": "number", "fieldType": "number"},
    ):
        response = await sandbox.client.post(
            PROPERTIES,
            json={**definition, "label": definition["name"], "groupName": "ai_receptionist"},
            headers=headers,
        )
        assert response.status_code == 201

    good = await sandbox.client.post(
        "/crm/v3/objects/contacts",
        json={"properties": {"follow_up_required": True, "ai_lead_score": 82}},
        headers=headers,
    )
    bad = await sandbox.client.post(
        "/crm/v3/objects/contacts",
        json={"properties": {"follow_up_required": "maybe", "ai_lead_score": "high"}},
        headers=headers,
    )

    assert good.json()["properties"]["follow_up_required"] == "true"
    assert good.json()["properties"]["ai_lead_score"] == "82"
    assert bad.status_code == 400
    assert "INVALID_BOOLEAN" in bad.json()["message"]
    assert "INVALID_NUMBER" in bad.json()["message"]


async def test_deleted_custom_property_can_no_longer_be_written(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    await make_group(sandbox, headers)
    await sandbox.client.post(PROPERTIES, json=outcome_property(), headers=headers)

    deleted = await sandbox.client.delete(f"{PROPERTIES}/call_outcome", headers=headers)
    default = await sandbox.client.delete(f"{PROPERTIES}/email", headers=headers)
    write = await sandbox.client.post(
        "/crm/v3/objects/contacts",
        json={"properties": {"call_outcome": "appointment_booked"}},
        headers=headers,
    )

    assert deleted.status_code == 204
    assert default.status_code == 400
    assert write.status_code == 400
    assert "PROPERTY_DOESNT_EXIST" in write.json()["message"]


async def test_writing_properties_without_the_schema_scope_is_403(sandbox: Sandbox) -> None:
    headers = await sandbox.token(
        scope="oauth crm.objects.contacts.read crm.objects.contacts.write crm.schemas.contacts.read"
    )

    read = await sandbox.client.get(PROPERTIES, headers=headers)
    write = await sandbox.client.post(
        f"{PROPERTIES}/groups", json={"name": "g", "label": "G"}, headers=headers
    )

    assert read.status_code == 200
    assert write.status_code == 403
    body = write.json()
    assert body["category"] == "MISSING_SCOPES"
    assert body["errors"][0]["context"]["requiredGranularScopes"] == ["crm.schemas.contacts.write"]


def marketing_event(**overrides: Any) -> dict[str, Any]:
    return {
        "externalEventId": "google-ads-spring",
        "externalAccountId": "1001",
        "eventName": "AI receptionist — google-ads-spring",
        "eventOrganizer": "Hubline",
        "customProperties": [],
        **overrides,
    }


async def test_marketing_events_need_the_scope_a_starter_portal_lacks(sandbox: Sandbox) -> None:
    headers = await sandbox.token(1003)

    response = await sandbox.client.post(EVENTS, json=marketing_event(), headers=headers)

    assert response.status_code == 403
    assert response.json()["category"] == "MISSING_SCOPES"


async def test_marketing_event_create_read_and_conflict(sandbox: Sandbox) -> None:
    headers = await sandbox.token(1001)

    created = await sandbox.client.post(EVENTS, json=marketing_event(), headers=headers)
    again = await sandbox.client.post(EVENTS, json=marketing_event(), headers=headers)
    upserted = await sandbox.client.put(
        f"{EVENTS}/google-ads-spring", json=marketing_event(eventName="Renamed"), headers=headers
    )
    read = await sandbox.client.get(
        f"{EVENTS}/google-ads-spring", params={"externalAccountId": "1001"}, headers=headers
    )
    missing = await sandbox.client.post(EVENTS, json={"externalEventId": "x"}, headers=headers)

    assert created.status_code == 200
    assert created.json()["eventOrganizer"] == "Hubline"
    assert again.status_code == 409
    assert upserted.status_code == 200
    assert read.json()["eventName"] == "Renamed"
    assert read.json()["objectId"] == created.json()["objectId"]
    assert missing.status_code == 400


async def test_attendance_by_email_creates_missing_contacts(sandbox: Sandbox) -> None:
    headers = await sandbox.token(1001)
    await sandbox.client.post(EVENTS, json=marketing_event(), headers=headers)
    existing = await sandbox.client.post(
        "/crm/v3/objects/contacts",
        json={"properties": {"email": "ada@example.com"}},
        headers=headers,
    )

    response = await sandbox.client.post(
        "/marketing/v3/marketing-events/attendance/google-ads-spring/ATTENDED/email-create",
        params={"externalAccountId": "1001"},
        json={
            "inputs": [
                {"email": "ada@example.com", "interactionDateTime": 1772461800000},
                {"email": "new@example.com", "interactionDateTime": 1772461800000},
            ]
        },
        headers=headers,
    )

    assert response.status_code == 200
    vids = {r["email"]: str(r["vid"]) for r in response.json()["results"]}
    assert vids["ada@example.com"] == existing.json()["id"]
    assert sandbox.state.portal(1001).find_by_email("new@example.com") is not None
    attendance = sandbox.state.portal(1001).attendance
    assert [(a.contact_id, a.state) for a in attendance] == [
        (vids["ada@example.com"], "ATTENDED"),
        (vids["new@example.com"], "ATTENDED"),
    ]


async def test_attendance_by_contact_id_and_for_unknown_events(sandbox: Sandbox) -> None:
    headers = await sandbox.token(1001)
    await sandbox.client.post(EVENTS, json=marketing_event(), headers=headers)
    contact = await sandbox.client.post(
        "/crm/v3/objects/contacts", json={"properties": {"firstname": "Ada"}}, headers=headers
    )

    by_id = await sandbox.client.post(
        "/marketing/v3/marketing-events/attendance/google-ads-spring/attend/create",
        params={"externalAccountId": "1001"},
        json={"inputs": [{"vid": int(contact.json()["id"]), "interactionDateTime": 0}]},
        headers=headers,
    )
    unknown = await sandbox.client.post(
        "/marketing/v3/marketing-events/attendance/nope/ATTENDED/email-create",
        params={"externalAccountId": "1001"},
        json={"inputs": [{"email": "ada@example.com"}]},
        headers=headers,
    )

    assert by_id.status_code == 200
    assert sandbox.state.portal(1001).attendance[0].contact_id == contact.json()["id"]
    assert unknown.status_code == 404


def test_timestamps_are_iso_8601_with_a_four_digit_year() -> None:
    assert iso(datetime(2026, 3, 2, 14, 30, 0, 123000, tzinfo=UTC).timestamp()) == (
        "2026-03-02T14:30:00.123Z"
    )
    # strftime's %Y wrote "202-03-02…", which no ISO 8601 reader takes.
    assert iso(datetime(202, 3, 2, 14, 30, tzinfo=UTC).timestamp()) == "0202-03-02T14:30:00.000Z"
