"""Contacts, calls and notes: writes, validation, conflicts, batches, associations, merges."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.sandbox.crm import ASSOCIATION_PAGE_SIZE
from tests.sandbox.conftest import Sandbox

CONTACTS = "/crm/v3/objects/contacts"


async def create_contact(sandbox: Sandbox, headers: dict[str, str], **properties: Any) -> str:
    response = await sandbox.client.post(CONTACTS, json={"properties": properties}, headers=headers)
    assert response.status_code == 201, response.text
    object_id: str = response.json()["id"]
    return object_id


def association(contact_id: str, type_id: int) -> list[dict[str, Any]]:
    return [
        {
            "to": {"id": contact_id},
            "types": [{"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": type_id}],
        }
    ]


def property_errors(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The structured list inside HubSpot's 'Property values were not valid: [...]' message."""
    prefix = "Property values were not valid: "
    assert body["message"].startswith(prefix)
    errors: list[dict[str, Any]] = json.loads(body["message"][len(prefix) :])
    return errors


async def test_create_and_read_a_contact_by_id_and_by_email(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    contact_id = await create_contact(
        sandbox, headers, email="Ada@Example.com", firstname="Ada", phone="+1 415 555 0100"
    )

    by_id = await sandbox.client.get(f"{CONTACTS}/{contact_id}", headers=headers)
    by_email = await sandbox.client.get(
        f"{CONTACTS}/ADA@example.com",
        params={"idProperty": "email", "properties": "phone,firstname"},
        headers=headers,
    )

    assert by_id.status_code == 200
    assert by_id.json()["properties"]["email"] == "ada@example.com"
    assert by_id.json()["properties"]["firstname"] == "Ada"
    assert "phone" not in by_id.json()["properties"], "phone is not a default property"
    assert by_email.json()["id"] == contact_id
    assert by_email.json()["properties"]["phone"] == "+1 415 555 0100", "stored as typed"


async def test_reading_an_unknown_contact_is_404(sandbox: Sandbox) -> None:
    headers = await sandbox.token()

    response = await sandbox.client.get(f"{CONTACTS}/999", headers=headers)

    assert response.status_code == 404
    assert response.json()["category"] == "OBJECT_NOT_FOUND"


async def test_calculated_phone_numbers_are_maintained_and_read_only(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    contact_id = await create_contact(
        sandbox, headers, phone="(415) 555-0100", mobilephone="+44 20 7946 0958"
    )

    contact = sandbox.state.portal(1001).get("contacts", contact_id)
    assert contact is not None
    props = contact.properties
    rejected = await sandbox.client.patch(
        f"{CONTACTS}/{contact_id}",
        json={"properties": {"hs_searchable_calculated_phone_number": "1"}},
        headers=headers,
    )

    assert props["hs_searchable_calculated_phone_number"] == "4155550100"
    assert props["hs_searchable_calculated_international_phone_number"] == "14155550100"
    assert props["hs_searchable_calculated_mobile_number"] == "2079460958"
    assert props["hs_searchable_calculated_international_mobile_number"] == "442079460958"
    assert rejected.status_code == 400
    assert property_errors(rejected.json())[0]["error"] == "READ_ONLY_VALUE"


async def test_patch_updates_and_clearing_a_phone_clears_its_calculated_copy(
    sandbox: Sandbox,
) -> None:
    headers = await sandbox.token()
    contact_id = await create_contact(sandbox, headers, phone="415-555-0100")

    response = await sandbox.client.patch(
        f"{CONTACTS}/{contact_id}",
        json={"properties": {"phone": "", "lastname": "Lovelace"}},
        headers=headers,
    )

    assert response.status_code == 200
    props = response.json()["properties"]
    assert props["lastname"] == "Lovelace"
    assert "phone" not in props
    assert "hs_searchable_calculated_phone_number" not in props


async def test_duplicate_email_is_409_with_the_existing_id(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    contact_id = await create_contact(sandbox, headers, email="ada@example.com")

    response = await sandbox.client.post(
        CONTACTS, json={"properties": {"email": "ADA@example.COM"}}, headers=headers
    )

    assert response.status_code == 409
    body = response.json()
    assert body["category"] == "CONFLICT"
    assert body["status"] == "error"
    assert body["message"] == f"Contact already exists. Existing ID: {contact_id}"
    assert len(sandbox.state.contacts(1001)) == 1


async def test_duplicate_email_inside_batch_create_is_409_and_creates_nothing(
    sandbox: Sandbox,
) -> None:
    headers = await sandbox.token()
    contact_id = await create_contact(sandbox, headers, email="ada@example.com")
    inputs = [
        {"properties": {"email": "new@example.com"}},
        {"properties": {"email": "Ada@example.com"}},
    ]

    response = await sandbox.client.post(
        f"{CONTACTS}/batch/create", json={"inputs": inputs}, headers=headers
    )

    assert response.status_code == 409
    assert response.json()["message"] == f"Contact already exists. Existing ID: {contact_id}"
    assert len(sandbox.state.contacts(1001)) == 1


@pytest.mark.parametrize(
    ("properties", "error"),
    [
        ({"favourite_colour": "blue"}, "PROPERTY_DOESNT_EXIST"),
        ({"lifecyclestage": "royalty"}, "INVALID_OPTION"),
        ({"email": "not-an-email"}, "INVALID_EMAIL"),
    ],
)
async def test_invalid_values_are_400_validation_errors(
    sandbox: Sandbox, properties: dict[str, str], error: str
) -> None:
    headers = await sandbox.token()

    response = await sandbox.client.post(CONTACTS, json={"properties": properties}, headers=headers)

    assert response.status_code == 400
    assert response.json()["category"] == "VALIDATION_ERROR"
    assert property_errors(response.json())[0]["error"] == error
    assert sandbox.state.contacts(1001) == []


async def test_malformed_number_and_missing_timestamp_on_a_call_are_rejected(
    sandbox: Sandbox,
) -> None:
    headers = await sandbox.token()

    response = await sandbox.client.post(
        "/crm/v3/objects/calls",
        json={"properties": {"hs_call_duration": "eight minutes"}},
        headers=headers,
    )

    errors = {e["name"]: e["error"] for e in property_errors(response.json())}
    assert response.status_code == 400
    assert errors == {"hs_call_duration": "INVALID_NUMBER", "hs_timestamp": "REQUIRED_FIELD"}


async def test_a_call_recording_link_must_be_https(sandbox: Sandbox) -> None:
    headers = await sandbox.token()

    def call(url: str) -> dict[str, Any]:
        return {"properties": {"hs_timestamp": 0, "hs_call_recording_url": url}}

    plain = await sandbox.client.post(
        "/crm/v3/objects/calls", json=call("http://r.example.com/1.mp3"), headers=headers
    )
    secure = await sandbox.client.post(
        "/crm/v3/objects/calls", json=call("https://r.example.com/1.mp3"), headers=headers
    )

    assert plain.status_code == 400
    assert property_errors(plain.json())[0]["error"] == "INVALID_URL"
    assert secure.status_code == 201


async def test_call_and_note_associate_with_a_contact(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    contact_id = await create_contact(sandbox, headers, email="ada@example.com")

    call = await sandbox.client.post(
        "/crm/v3/objects/calls",
        json={
            "properties": {
                "hs_timestamp": "2026-03-02T14:30:00Z",
                "hs_call_title": "AI receptionist call",
                "hs_call_duration": 480000,
                "hs_call_direction": "INBOUND",
                "hs_call_status": "COMPLETED",
            },
            "associations": association(contact_id, 194),
        },
        headers=headers,
    )
    note = await sandbox.client.post(
        "/crm/v3/objects/notes",
        json={
            "properties": {"hs_timestamp": 1772461800000, "hs_note_body": "AI receptionist text"},
            "associations": association(contact_id, 202),
        },
        headers=headers,
    )

    assert call.status_code == note.status_code == 201
    assert call.json()["properties"]["hs_timestamp"] == "2026-03-02T14:30:00.000Z"
    world = sandbox.state.portal(1001)
    assert world.associated("contacts", contact_id, "calls") == [call.json()["id"]]
    assert world.associated("contacts", contact_id, "notes") == [note.json()["id"]]
    read = await sandbox.client.get(
        f"/crm/v3/objects/calls/{call.json()['id']}",
        params={"associations": "contacts"},
        headers=headers,
    )
    assert read.json()["associations"]["contacts"]["results"] == [
        {"id": contact_id, "type": "call_to_contact"}
    ]


@pytest.mark.parametrize(
    ("contact", "type_id"), [("999999", 194), (None, 202)], ids=["unknown-contact", "wrong-type"]
)
async def test_associations_to_unknown_contacts_or_with_wrong_types_are_rejected(
    sandbox: Sandbox, contact: str | None, type_id: int
) -> None:
    headers = await sandbox.token()
    contact_id = contact or await create_contact(sandbox, headers, firstname="Ada")

    response = await sandbox.client.post(
        "/crm/v3/objects/calls",
        json={
            "properties": {"hs_timestamp": "2026-03-02T14:30:00Z"},
            "associations": association(contact_id, type_id),
        },
        headers=headers,
    )

    assert response.status_code == 400
    assert response.json()["category"] == "VALIDATION_ERROR"
    assert sandbox.state.calls(1001) == []


async def test_association_batch_read_pages_and_names_records_without_any(
    sandbox: Sandbox,
) -> None:
    headers = await sandbox.token()
    busy = await create_contact(sandbox, headers, firstname="Busy")
    quiet = await create_contact(sandbox, headers, firstname="Quiet")
    world = sandbox.state.portal(1001)
    made = []
    for n in range(ASSOCIATION_PAGE_SIZE + 5):
        response = await sandbox.client.post(
            "/crm/v3/objects/calls",
            json={"properties": {"hs_timestamp": n}, "associations": association(busy, 194)},
            headers=headers,
        )
        made.append(response.json()["id"])
    url = "/crm/v4/associations/contacts/calls/batch/read"

    first = await sandbox.client.post(
        url, json={"inputs": [{"id": busy}, {"id": quiet}, {"id": "999999"}]}, headers=headers
    )
    assert first.status_code == 207
    [entry] = first.json()["results"]
    assert entry["from"] == {"id": busy}
    assert [str(t["toObjectId"]) for t in entry["to"]] == made[:ASSOCIATION_PAGE_SIZE]
    assert entry["to"][0]["associationTypes"][0]["typeId"] == 193  # contact to call
    errors = first.json()["errors"]
    assert [e["subCategory"] for e in errors] == ["crm.associations.NO_ASSOCIATIONS_FOUND"] * 2
    assert [e["context"]["fromObjectId"] for e in errors] == [[quiet], ["999999"]]
    after = entry["paging"]["next"]["after"]
    rest = await sandbox.client.post(
        url, json={"inputs": [{"id": busy, "after": after}]}, headers=headers
    )
    assert rest.status_code == 200
    [entry] = rest.json()["results"]
    assert [str(t["toObjectId"]) for t in entry["to"]] == made[ASSOCIATION_PAGE_SIZE:]
    assert "paging" not in entry
    assert world.associated("contacts", busy, "calls") == made

    too_many = await sandbox.client.post(
        url, json={"inputs": [{"id": str(n)} for n in range(1001)]}, headers=headers
    )
    assert too_many.status_code == 400


async def test_batch_of_101_inputs_is_400(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    inputs = [{"properties": {"firstname": f"P{i}"}} for i in range(101)]

    response = await sandbox.client.post(
        f"{CONTACTS}/batch/create", json={"inputs": inputs}, headers=headers
    )

    assert response.status_code == 400
    assert response.json()["category"] == "VALIDATION_ERROR"
    assert sandbox.state.contacts(1001) == []


async def test_batch_of_100_inputs_is_created(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    inputs = [{"properties": {"email": f"p{i}@example.com"}} for i in range(100)]

    response = await sandbox.client.post(
        f"{CONTACTS}/batch/create", json={"inputs": inputs}, headers=headers
    )

    assert response.status_code == 201
    assert response.json()["status"] == "COMPLETE"
    assert len(response.json()["results"]) == 100
    assert len(sandbox.state.contacts(1001)) == 100


async def test_batch_with_one_invalid_input_fails_whole(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    inputs = [
        {"properties": {"firstname": "Fine"}},
        {"properties": {"lifecyclestage": "not-an-option"}},
    ]

    response = await sandbox.client.post(
        f"{CONTACTS}/batch/create", json={"inputs": inputs}, headers=headers
    )

    assert response.status_code == 400
    assert property_errors(response.json())[0]["name"] == "lifecyclestage"
    assert sandbox.state.contacts(1001) == []


async def test_batch_read_by_email_reports_missing_ones_with_207(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    contact_id = await create_contact(sandbox, headers, email="ada@example.com")

    response = await sandbox.client.post(
        f"{CONTACTS}/batch/read",
        json={
            "idProperty": "email",
            "properties": ["email"],
            "inputs": [{"id": "ada@example.com"}, {"id": "ghost@example.com"}],
        },
        headers=headers,
    )

    body = response.json()
    assert response.status_code == 207
    assert [r["id"] for r in body["results"]] == [contact_id]
    assert body["numErrors"] == 1
    assert body["errors"][0]["category"] == "OBJECT_NOT_FOUND"
    assert body["errors"][0]["context"]["ids"] == ["ghost@example.com"]


async def test_batch_upsert_by_email_creates_and_updates(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    existing = await create_contact(sandbox, headers, email="ada@example.com", firstname="Ada")

    response = await sandbox.client.post(
        f"{CONTACTS}/batch/upsert",
        json={
            "inputs": [
                {"id": "ada@example.com", "idProperty": "email", "properties": {"lastname": "L"}},
                {
                    "id": "bob@example.com",
                    "idProperty": "email",
                    "properties": {"firstname": "Bob"},
                },
            ]
        },
        headers=headers,
    )

    results = {r["properties"]["email"]: r for r in response.json()["results"]}
    assert response.status_code == 200
    assert results["ada@example.com"]["id"] == existing
    assert results["ada@example.com"]["new"] is False
    assert results["ada@example.com"]["properties"]["firstname"] == "Ada"
    assert results["bob@example.com"]["new"] is True
    assert len(sandbox.state.contacts(1001)) == 2


async def test_upsert_by_phone_is_rejected(sandbox: Sandbox) -> None:
    headers = await sandbox.token()

    response = await sandbox.client.post(
        f"{CONTACTS}/batch/upsert",
        json={"inputs": [{"id": "4155550100", "idProperty": "phone", "properties": {}}]},
        headers=headers,
    )

    assert response.status_code == 400


async def test_batch_update_and_archive(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    first = await create_contact(sandbox, headers, firstname="A")
    second = await create_contact(sandbox, headers, firstname="B")

    updated = await sandbox.client.post(
        f"{CONTACTS}/batch/update",
        json={"inputs": [{"id": first, "properties": {"lastname": "One"}}]},
        headers=headers,
    )
    archived = await sandbox.client.post(
        f"{CONTACTS}/batch/archive", json={"inputs": [{"id": second}]}, headers=headers
    )

    assert updated.status_code == 200
    assert updated.json()["results"][0]["properties"]["lastname"] == "One"
    assert archived.status_code == 204
    assert [c.id for c in sandbox.state.contacts(1001)] == [first]


async def test_archive_hides_the_contact(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    contact_id = await create_contact(sandbox, headers, firstname="A")

    deleted = await sandbox.client.delete(f"{CONTACTS}/{contact_id}", headers=headers)

    assert deleted.status_code == 204
    assert (
        await sandbox.client.get(f"{CONTACTS}/{contact_id}", headers=headers)
    ).status_code == 404


async def test_merge_keeps_primary_values_and_moves_the_timeline(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    primary = await create_contact(sandbox, headers, email="ada@example.com", firstname="Ada")
    merged = await create_contact(sandbox, headers, firstname="Adeline", phone="415 555 0100")
    call = await sandbox.client.post(
        "/crm/v3/objects/calls",
        json={"properties": {"hs_timestamp": 0}, "associations": association(merged, 194)},
        headers=headers,
    )

    response = await sandbox.client.post(
        f"{CONTACTS}/merge",
        json={"primaryObjectId": primary, "objectIdToMerge": merged},
        headers=headers,
    )

    props = response.json()["properties"]
    assert response.status_code == 200
    assert props["firstname"] == "Ada"
    assert props["phone"] == "415 555 0100"
    assert props["hs_merged_object_ids"] == merged
    world = sandbox.state.portal(1001)
    assert world.associated("contacts", primary, "calls") == [call.json()["id"]]
    old_id = await sandbox.client.get(f"{CONTACTS}/{merged}", headers=headers)
    assert old_id.json()["id"] == primary, "a merged id reads as the surviving contact"


async def test_gdpr_delete_removes_the_contact_for_good(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    contact_id = await create_contact(sandbox, headers, email="ada@example.com")

    response = await sandbox.client.post(
        f"{CONTACTS}/gdpr-delete", json={"objectId": contact_id}, headers=headers
    )

    assert response.status_code == 204
    assert contact_id not in sandbox.state.portal(1001).objects["contacts"]


async def test_list_pages_through_contacts(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    ids = [await create_contact(sandbox, headers, firstname=f"P{i}") for i in range(3)]

    first = await sandbox.client.get(CONTACTS, params={"limit": 2}, headers=headers)
    after = first.json()["paging"]["next"]["after"]
    second = await sandbox.client.get(
        CONTACTS, params={"limit": 2, "after": after}, headers=headers
    )

    assert [r["id"] for r in first.json()["results"]] == ids[:2]
    assert [r["id"] for r in second.json()["results"]] == ids[2:]
    assert "paging" not in second.json()


async def test_a_portal_sees_only_its_own_contacts(sandbox: Sandbox) -> None:
    acme = await sandbox.token(1001)
    bright = await sandbox.token(1002)
    contact_id = await create_contact(sandbox, acme, email="ada@example.com")

    response = await sandbox.client.get(f"{CONTACTS}/{contact_id}", headers=bright)

    assert response.status_code == 404
    assert await create_contact(sandbox, bright, email="ada@example.com")
