"""CRM search: groups OR'd, filters AND'ed, operators, calculated phones, limits, paging, lag."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.sandbox import ManualClock
from app.sandbox.properties import default_properties
from app.sandbox.search import compile_matcher, parse_request, record_matches
from tests.sandbox.conftest import Sandbox

SEARCH = "/crm/v3/objects/contacts/search"


def flt(name: str, operator: str, value: Any = None, **extra: Any) -> dict[str, Any]:
    found: dict[str, Any] = {"propertyName": name, "operator": operator, **extra}
    if value is not None:
        found["value"] = value
    return found


@pytest.fixture
async def people(sandbox: Sandbox) -> dict[str, Any]:
    """Three contacts; answers the headers and the ids by first name."""
    headers = await sandbox.token()
    rows = [
        {
            "firstname": "Ada",
            "lastname": "Lovelace",
            "email": "ada@example.com",
            "phone": "(415) 555-0100",
        },
        {
            "firstname": "Bob",
            "lastname": "Byte",
            "email": "bob@example.org",
            "mobilephone": "+1 212 555 0199",
        },
        {
            "firstname": "Cy",
            "lastname": "Lovelace",
            "phone": "+44 20 7946 0958",
            "lifecyclestage": "lead",
        },
    ]
    response = await sandbox.client.post(
        "/crm/v3/objects/contacts/batch/create",
        json={"inputs": [{"properties": r} for r in rows]},
        headers=headers,
    )
    ids = {r["properties"]["firstname"]: r["id"] for r in response.json()["results"]}
    return {"headers": headers, **ids}


async def search(sandbox: Sandbox, people: dict[str, Any], body: dict[str, Any]) -> list[str]:
    sandbox.clock.advance(0.25)  # stay under 5 searches a second
    response = await sandbox.client.post(SEARCH, json=body, headers=people["headers"])
    assert response.status_code == 200, response.text
    names = [next(k for k, v in people.items() if v == r["id"]) for r in response.json()["results"]]
    assert response.json()["total"] == len(names)
    return sorted(names)


def groups(*filter_lists: list[dict[str, Any]]) -> dict[str, Any]:
    return {"filterGroups": [{"filters": f} for f in filter_lists]}


async def test_filters_in_a_group_are_anded(sandbox: Sandbox, people: dict[str, Any]) -> None:
    body = groups([flt("lastname", "EQ", "Lovelace"), flt("firstname", "EQ", "Ada")])

    assert await search(sandbox, people, body) == ["Ada"]


async def test_groups_are_ored(sandbox: Sandbox, people: dict[str, Any]) -> None:
    body = groups([flt("firstname", "EQ", "Ada")], [flt("firstname", "EQ", "Bob")])

    assert await search(sandbox, people, body) == ["Ada", "Bob"]


async def test_eq_on_strings_ignores_case(sandbox: Sandbox, people: dict[str, Any]) -> None:
    assert await search(sandbox, people, groups([flt("email", "EQ", "ADA@EXAMPLE.COM")])) == ["Ada"]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ([flt("lastname", "NEQ", "Lovelace")], ["Bob"]),
        ([flt("email", "HAS_PROPERTY")], ["Ada", "Bob"]),
        ([flt("email", "NOT_HAS_PROPERTY")], ["Cy"]),
        ([flt("email", "IN", values=["ada@example.com", "bob@example.org"])], ["Ada", "Bob"]),
        ([flt("email", "NOT_IN", values=["ada@example.com"])], ["Bob", "Cy"]),
        ([flt("email", "CONTAINS_TOKEN", "*@example.org")], ["Bob"]),
        ([flt("lastname", "NOT_CONTAINS_TOKEN", "love*")], ["Bob"]),
        ([flt("lifecyclestage", "EQ", "lead")], ["Cy"]),
    ],
)
async def test_operators(
    sandbox: Sandbox, people: dict[str, Any], filters: list[dict[str, Any]], expected: list[str]
) -> None:
    assert await search(sandbox, people, groups(filters)) == expected


async def test_in_values_must_be_lowercase_for_strings(
    sandbox: Sandbox, people: dict[str, Any]
) -> None:
    # HubSpot compares IN values as given against lower-cased stored strings.
    body = groups([flt("email", "IN", values=["ADA@example.com"])])

    assert await search(sandbox, people, body) == []


async def test_calculated_phone_finds_numbers_typed_in_any_format(
    sandbox: Sandbox, people: dict[str, Any]
) -> None:
    by_eq = groups([flt("hs_searchable_calculated_phone_number", "EQ", "4155550100")])
    by_token = groups(
        [flt("hs_searchable_calculated_phone_number", "CONTAINS_TOKEN", "*4155550100")],
        [flt("hs_searchable_calculated_mobile_number", "CONTAINS_TOKEN", "*4155550100")],
    )
    mobile = groups([flt("hs_searchable_calculated_mobile_number", "EQ", "2125550199")])
    international = groups(
        [flt("hs_searchable_calculated_international_phone_number", "EQ", "442079460958")]
    )
    raw_e164 = groups([flt("phone", "EQ", "+14155550100")])

    assert await search(sandbox, people, by_eq) == ["Ada"]
    assert await search(sandbox, people, by_token) == ["Ada"]
    assert await search(sandbox, people, mobile) == ["Bob"]
    assert await search(sandbox, people, international) == ["Cy"]
    assert await search(sandbox, people, raw_e164) == [], "phone itself is stored as typed"


async def test_numeric_and_date_comparisons(sandbox: Sandbox, clock: ManualClock) -> None:
    headers = await sandbox.token()
    for duration, when in ((1000, "2026-01-01T00:00:00Z"), (5000, "2026-02-01T00:00:00Z")):
        await sandbox.client.post(
            "/crm/v3/objects/calls",
            json={"properties": {"hs_call_duration": duration, "hs_timestamp": when}},
            headers=headers,
        )

    async def titles(filters: list[dict[str, Any]]) -> list[str]:
        clock.advance(0.25)
        response = await sandbox.client.post(
            "/crm/v3/objects/calls/search",
            json={**groups(filters), "properties": ["hs_call_duration"]},
            headers=headers,
        )
        return [r["properties"]["hs_call_duration"] for r in response.json()["results"]]

    assert await titles([flt("hs_call_duration", "GT", "999")]) == ["1000", "5000"]
    assert await titles([flt("hs_call_duration", "GTE", "5000")]) == ["5000"]
    assert await titles([flt("hs_call_duration", "LT", "5000")]) == ["1000"]
    assert await titles([flt("hs_call_duration", "LTE", "1000")]) == ["1000"]
    assert await titles([flt("hs_timestamp", "GTE", "1768000000000")]) == ["5000"]
    assert await titles([flt("hs_call_duration", "BETWEEN", "500", highValue="2000")]) == ["1000"]


async def test_calls_and_notes_can_be_searched_by_associated_contact(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    contacts = []
    for name in ("Ada", "Bob"):
        response = await sandbox.client.post(
            "/crm/v3/objects/contacts", json={"properties": {"firstname": name}}, headers=headers
        )
        contacts.append(response.json()["id"])
    for contact_id in contacts:
        await sandbox.client.post(
            "/crm/v3/objects/notes",
            json={
                "properties": {"hs_timestamp": 0, "hs_note_body": f"note for {contact_id}"},
                "associations": [
                    {
                        "to": {"id": contact_id},
                        "types": [
                            {"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 202}
                        ],
                    }
                ],
            },
            headers=headers,
        )

    response = await sandbox.client.post(
        "/crm/v3/objects/notes/search",
        json={
            **groups([flt("associations.contact", "EQ", contacts[1])]),
            "properties": ["hs_note_body"],
        },
        headers=headers,
    )

    assert [r["properties"]["hs_note_body"] for r in response.json()["results"]] == [
        f"note for {contacts[1]}"
    ]


@pytest.mark.parametrize(
    "body",
    [
        {"filterGroups": [{"filters": [flt("email", "HAS_PROPERTY")]}] * 6},
        {"filterGroups": [{"filters": [flt("email", "HAS_PROPERTY")] * 7}]},
        {"filterGroups": [{"filters": [flt("email", "HAS_PROPERTY")] * 5}] * 4},
        {"limit": 201},
        {"filterGroups": [{"filters": [flt("email", "SOUNDS_LIKE", "x")]}]},
        {"filterGroups": [{"filters": [flt("no_such_property", "EQ", "x")]}]},
    ],
    ids=["6-groups", "7-filters", "20-filters", "limit-201", "bad-operator", "unknown-property"],
)
async def test_requests_beyond_hubspots_limits_are_400(
    sandbox: Sandbox, body: dict[str, Any]
) -> None:
    headers = await sandbox.token()

    response = await sandbox.client.post(SEARCH, json=body, headers=headers)

    assert response.status_code == 400
    assert response.json()["category"] == "VALIDATION_ERROR"


async def test_the_largest_allowed_request_is_accepted(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    body = {
        "filterGroups": [{"filters": [flt("email", "HAS_PROPERTY")] * 6}] * 3,
        "limit": 200,
    }

    response = await sandbox.client.post(SEARCH, json=body, headers=headers)

    assert response.status_code == 200


async def test_paging_and_sorting(sandbox: Sandbox, people: dict[str, Any]) -> None:
    body: dict[str, Any] = {
        "sorts": [{"propertyName": "firstname", "direction": "DESCENDING"}],
        "limit": 2,
    }

    first = await sandbox.client.post(SEARCH, json=body, headers=people["headers"])
    after = first.json()["paging"]["next"]["after"]
    second = await sandbox.client.post(
        SEARCH, json={**body, "after": after}, headers=people["headers"]
    )

    assert first.json()["total"] == 3
    names = [
        r["properties"]["firstname"] for r in first.json()["results"] + second.json()["results"]
    ]
    assert names == ["Cy", "Bob", "Ada"]
    assert "paging" not in second.json()


async def test_search_lags_writes(sandbox: Sandbox, clock: ManualClock) -> None:
    sandbox.config.search_lag_seconds = 3.0
    headers = await sandbox.token()
    created = await sandbox.client.post(
        "/crm/v3/objects/contacts",
        json={"properties": {"email": "ada@example.com"}},
        headers=headers,
    )
    body = groups([flt("email", "EQ", "ada@example.com")])

    before = await sandbox.client.post(SEARCH, json=body, headers=headers)
    clock.advance(3.0)
    after = await sandbox.client.post(SEARCH, json=body, headers=headers)
    await sandbox.client.patch(
        f"/crm/v3/objects/contacts/{created.json()['id']}",
        json={"properties": {"email": "ada@new.example.com"}},
        headers=headers,
    )
    clock.advance(1.0)
    stale = await sandbox.client.post(SEARCH, json=body, headers=headers)
    clock.advance(2.0)
    fresh = await sandbox.client.post(SEARCH, json=body, headers=headers)

    assert before.json()["total"] == 0, "not searchable right after the write"
    assert after.json()["total"] == 1
    assert stale.json()["total"] == 1, "the old value is still indexed"
    assert fresh.json()["total"] == 0


async def test_merged_and_deleted_contacts_leave_search(
    sandbox: Sandbox, people: dict[str, Any]
) -> None:
    headers = people["headers"]
    await sandbox.client.post(
        "/crm/v3/objects/contacts/merge",
        json={"primaryObjectId": people["Ada"], "objectIdToMerge": people["Cy"]},
        headers=headers,
    )
    await sandbox.client.post(
        "/crm/v3/objects/contacts/gdpr-delete", json={"objectId": people["Bob"]}, headers=headers
    )

    assert await search(sandbox, people, {}) == ["Ada"]


@given(
    stored=st.lists(
        st.dictionaries(
            st.sampled_from(["email", "phone", "firstname", "hs_object_id"]),
            st.sampled_from(["", "a@x.io", "A@X.io", "4155550100", "Ada", "7", "b@y.io"]),
        ),
        max_size=8,
    ),
    groups=st.lists(
        st.tuples(
            st.sampled_from(["email", "phone", "firstname", "hs_object_id"]),
            st.lists(
                st.sampled_from(["a@x.io", "A@X.io", "4155550100", "ada", "7", "7.0", "x"]),
                min_size=1,
            ),
        ),
        min_size=1,
        max_size=5,
    ),
)
def test_the_compiled_in_lookup_answers_as_the_general_matcher(
    stored: list[dict[str, str]], groups: list[tuple[str, list[str]]]
) -> None:
    defs = default_properties("contacts", 0.0)
    body = {
        "filterGroups": [
            {"filters": [{"propertyName": name, "operator": "IN", "values": values}]}
            for name, values in groups
        ]
    }
    request = parse_request(body, defs)

    def no_associations(_object_id: str) -> Callable[[str], list[str]]:
        return lambda _target: []

    matches = compile_matcher(request, "contacts", defs, no_associations)
    assert matches.__name__ == "in_any_group", "the fast path applies to IN groups"
    for properties in stored:
        expected = record_matches(request, "contacts", properties, defs, no_associations(""))
        assert matches("1", properties) == expected
