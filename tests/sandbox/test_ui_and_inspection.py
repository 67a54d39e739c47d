"""The UI's forms (in-process) and the /_sandbox inspection endpoints."""

from __future__ import annotations

from tests.sandbox.conftest import Sandbox, bearer

CONTACTS = "/crm/v3/objects/contacts"


async def test_portal_page_shows_contacts_and_api_traffic(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    created = await sandbox.client.post(
        CONTACTS,
        json={
            "properties": {"firstname": "Ada", "email": "ada@example.com", "phone": "415 555 0100"}
        },
        headers=headers,
    )

    page = await sandbox.client.get("/portals/1001")

    contact_id = created.json()["id"]
    assert page.status_code == 200
    assert f'data-testid="contact-row-{contact_id}"' in page.text
    assert "ada@example.com" in page.text
    assert "415 555 0100" in page.text
    assert 'data-testid="traffic-row"' in page.text
    assert "/crm/v3/objects/contacts" in page.text
    assert 'data-testid="uninstall-app"' in page.text


async def test_edit_form_writes_changed_fields_and_reports_invalid_ones(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    created = await sandbox.client.post(
        CONTACTS, json={"properties": {"firstname": "Ada"}}, headers=headers
    )
    contact_id = created.json()["id"]
    page = f"/portals/1001/contacts/{contact_id}"

    saved = await sandbox.client.post(
        f"{page}/edit", data={"p_firstname": "Ada", "p_lastname": "L"}
    )
    invalid = await sandbox.client.post(f"{page}/edit", data={"p_email": "nope"})

    assert saved.status_code == 303
    contact = sandbox.state.portal(1001).get("contacts", contact_id)
    assert contact is not None
    assert contact.properties["lastname"] == "L"
    assert invalid.status_code == 400
    assert 'data-testid="form-error"' in invalid.text
    assert "email" not in contact.properties


async def test_contact_page_shows_the_timeline(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    contact_id = (
        await sandbox.client.post(CONTACTS, json={"properties": {}}, headers=headers)
    ).json()["id"]
    call = await sandbox.client.post(
        "/crm/v3/objects/calls",
        json={
            "properties": {
                "hs_timestamp": 0,
                "hs_call_title": "AI receptionist call",
                "hs_call_body": "Wants a cleaning<br><br>Caller: I&#x27;d like <b>Tuesday</b>",
            },
            "associations": [
                {
                    "to": {"id": contact_id},
                    "types": [{"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 194}],
                }
            ],
        },
        headers=headers,
    )

    page = await sandbox.client.get(f"/portals/1001/contacts/{contact_id}")

    assert f'data-testid="timeline-call-{call.json()["id"]}"' in page.text
    assert "Wants a cleaning" in page.text
    # As HubSpot shows the markup, not the markup itself (the page escapes the text).
    assert "Caller: I&#39;d like Tuesday" in page.text
    assert "&lt;br&gt;" not in page.text
    assert "&amp;#x27;" not in page.text


async def test_merge_form_merges_the_chosen_contact_into_this_one(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    first = (
        await sandbox.client.post(
            CONTACTS, json={"properties": {"firstname": "A"}}, headers=headers
        )
    ).json()["id"]
    second = (
        await sandbox.client.post(CONTACTS, json={"properties": {"lastname": "B"}}, headers=headers)
    ).json()["id"]

    response = await sandbox.client.post(
        f"/portals/1001/contacts/{first}/merge", data={"merge_with": second}
    )

    assert response.status_code == 303
    assert [c.id for c in sandbox.state.contacts(1001)] == [first]
    assert sandbox.state.contacts(1001)[0].properties["lastname"] == "B"


async def test_unknown_pages_are_404(sandbox: Sandbox) -> None:
    assert (await sandbox.client.get("/portals/9999")).status_code == 404
    assert (await sandbox.client.get("/portals/1001/contacts/1")).status_code == 404


async def test_inspection_shows_portal_state_tokens_and_counts(sandbox: Sandbox) -> None:
    tokens = await sandbox.install(1001)
    await sandbox.client.post(
        CONTACTS, json={"properties": {"firstname": "Ada"}}, headers=bearer(tokens["access_token"])
    )

    portal = (await sandbox.client.get("/_sandbox/portals/1001")).json()
    issued = (await sandbox.client.get("/_sandbox/tokens")).json()
    counts = (await sandbox.client.get("/_sandbox/counts")).json()

    assert portal["installed"] is True
    assert portal["contacts"] == 1
    assert portal["objects"]["contacts"][0]["properties"]["firstname"] == "Ada"
    assert tokens["access_token"] in issued["secrets"]
    assert tokens["refresh_token"] in issued["secrets"]
    assert counts == {"refresh": {}, "exchange": {"1001": 1}}


async def test_reset_forgets_everything(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    await sandbox.client.post(CONTACTS, json={"properties": {}}, headers=headers)

    await sandbox.client.post("/_sandbox/reset")

    assert sandbox.state.contacts(1001) == []
    assert not sandbox.state.portal(1001).installed
    assert (await sandbox.client.get(CONTACTS, headers=headers)).status_code == 401


async def test_settings_reject_unknown_names_and_wrong_types(sandbox: Sandbox) -> None:
    unknown = await sandbox.client.post("/_sandbox/settings", json={"nope": 1})
    wrong = await sandbox.client.post("/_sandbox/settings", json={"latency_seconds": "slow"})
    right = await sandbox.client.post("/_sandbox/settings", json={"search_lag_seconds": 2})

    assert unknown.status_code == wrong.status_code == 400
    assert right.json()["search_lag_seconds"] == 2
    assert sandbox.config.search_lag_seconds == 2


async def test_demo_seed_gives_each_portal_contacts(sandbox: Sandbox) -> None:
    sandbox.config.seed_demo_data = True

    await sandbox.client.post("/_sandbox/reset")

    phones = [
        c.properties.get("hs_searchable_calculated_phone_number")
        for c in sandbox.state.contacts(1002)
    ]
    assert "4155550142" in phones


async def test_hubspot_record_urls_lead_to_the_contact_page(sandbox: Sandbox) -> None:
    response = await sandbox.client.get("/contacts/1001/record/0-1/42")
    assert response.status_code == 302
    assert response.headers["location"] == "/portals/1001/contacts/42"
