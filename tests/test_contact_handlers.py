"""Contact handlers: HubSpot's contact webhooks keep the identity index right, end to end.

Contacts change in the sandbox; its webhook events are signed and delivered to Hubline's
route, and the worker runs the handlers, which read contacts back from the sandbox.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from app import identity
from app.contacts import erase_contact_data
from app.db import transaction
from app.inbox import NewEvent, enqueue, read_payload
from app.models import EventSource, EventStatus
from app.worker import Worker
from tests.conftest import SANDBOX_URL, TEST_CLIENT_SECRET
from tests.webhook_support import (
    add_portal,
    call_event,
    dumps,
    hubspot_event,
    inbox_rows,
    post_hubspot,
    receptionist_path,
    standard_headers,
)

PORTAL = 1001
ADA_PHONE = "+14155550100"


class Portal:
    """The installed sandbox portal: change contacts there, deliver its webhooks to Hubline."""

    def __init__(self, installed: Any, sandbox_app: Any, client: httpx.AsyncClient, services: Any):
        self.installed = installed
        self.sandbox_app = sandbox_app
        self.state = sandbox_app.state.sandbox
        self.client = client
        self.services = services
        token, _ = self.state.issue_tokens(PORTAL, ["crm.objects.contacts.write"])
        self.token = token.token
        self.delivered = len(self.state.webhook_events)

    async def crm(self, method: str, path: str, body: Any = None) -> Any:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.sandbox_app), base_url=SANDBOX_URL
        ) as http:
            response = await http.request(
                method, path, json=body, headers={"Authorization": f"Bearer {self.token}"}
            )
        assert response.is_success, response.text
        return response.json() if response.content else None

    async def create(self, **properties: str) -> str:
        created = await self.crm("POST", "/crm/v3/objects/contacts", {"properties": properties})
        return str(created["id"])

    def pending_events(self, *, reverse: bool = False) -> list[dict[str, Any]]:
        events = list(self.state.webhook_events)[self.delivered :]
        self.delivered = len(self.state.webhook_events)
        return events[::-1] if reverse else events

    async def sync(self, *, reverse: bool = False) -> list[dict[str, Any]]:
        """Deliver the sandbox's new webhook events to Hubline and let the worker handle them."""
        events = self.pending_events(reverse=reverse)
        if events:
            response = await post_hubspot(self.client, TEST_CLIENT_SECRET, events)
            assert response.status_code == 200, response.text
            assert response.json()["stored"] == len(events)
        await Worker(self.services).drain()
        return events

    async def lookup(self, kind: str, value: str) -> str | None:
        async with self.services.sessions() as session:
            return await identity.lookup(
                PORTAL, kind, value, session=session, cipher=self.services.cipher
            )


@pytest.fixture
async def portal(
    install_portal: Callable[..., Awaitable[Any]],
    sandbox_app: Any,
    client: httpx.AsyncClient,
    services: Any,
) -> Portal:
    installed = await install_portal(PORTAL)
    return Portal(installed, sandbox_app, client, services)


async def test_creation_phone_change_merge_and_deletion_keep_the_index_right(
    portal: Portal,
) -> None:
    ada = await portal.create(phone="(415) 555-0100", email="Ada@Example.com", firstname="Ada")
    await portal.sync()
    assert await portal.lookup("phone", ADA_PHONE) == ada
    assert await portal.lookup("email", "ada@example.com") == ada

    await portal.crm(
        "PATCH", f"/crm/v3/objects/contacts/{ada}", {"properties": {"phone": "415 555 0199"}}
    )
    await portal.sync()
    assert await portal.lookup("phone", ADA_PHONE) is None
    assert await portal.lookup("phone", "+14155550199") == ada

    await portal.crm(
        "PATCH",
        f"/crm/v3/objects/contacts/{ada}",
        {"properties": {"email": "ada@lovelace.example", "mobilephone": "+1 415 555 0111"}},
    )
    await portal.sync()
    assert await portal.lookup("email", "ada@example.com") is None
    assert await portal.lookup("email", "ada@lovelace.example") == ada
    assert await portal.lookup("phone", "+14155550111") == ada
    assert await portal.lookup("phone", "+14155550199") == ada

    grace = await portal.create(mobilephone="+1 415 555 0142", email="grace@example.com")
    await portal.sync()
    assert await portal.lookup("phone", "+14155550142") == grace
    await portal.crm(
        "POST",
        "/crm/v3/objects/contacts/merge",
        {"primaryObjectId": ada, "objectIdToMerge": grace},
    )
    await portal.sync()
    assert await portal.lookup("phone", "+14155550142") == ada
    assert await portal.lookup("email", "grace@example.com") == ada

    await portal.crm("DELETE", f"/crm/v3/objects/contacts/{ada}")
    await portal.sync()
    for kind, value in [
        ("phone", "+14155550199"),
        ("phone", "+14155550142"),
        ("email", "ada@lovelace.example"),
    ]:
        assert await portal.lookup(kind, value) is None
    rows = await inbox_rows(portal.services.sessions)
    contact_events = [row for row in rows if row.source == "hubspot"]
    assert contact_events
    assert {row.status for row in contact_events} == {EventStatus.done}


async def test_a_late_email_change_does_not_undo_a_newer_one(portal: Portal) -> None:
    ada = await portal.create(email="ada@example.com")
    await portal.sync()
    old = {
        "eventId": 900,
        "portalId": PORTAL,
        "appId": 424242,
        "occurredAt": 1_000_000_000_000,  # long before the creation
        "subscriptionType": "contact.propertyChange",
        "objectId": int(ada),
        "propertyName": "email",
        "propertyValue": "stale@example.com",
        "attemptNumber": 0,
    }
    assert (await post_hubspot(portal.client, TEST_CLIENT_SECRET, [old])).status_code == 200
    await portal.sync()
    assert await portal.lookup("email", "ada@example.com") == ada
    assert await portal.lookup("email", "stale@example.com") is None


async def test_a_property_change_for_an_unindexed_property_changes_nothing(
    portal: Portal,
) -> None:
    ada = await portal.create(phone=ADA_PHONE)
    await portal.sync()
    await portal.crm(
        "PATCH", f"/crm/v3/objects/contacts/{ada}", {"properties": {"firstname": "Ada"}}
    )
    await portal.sync()
    assert await portal.lookup("phone", ADA_PHONE) == ada


async def test_odd_shapes_hubspot_never_sends_are_handled_once_beside_good_events(
    portal: Portal,
) -> None:
    """Signed events whose fields hold what HubSpot never sends there (a list for a
    property name, a number for merged ids, an email that is no text at all) are done
    with at their first attempt: they raised before, were retried for minutes and took
    an attempt from every good event in their batch."""
    ada = await portal.create(phone=ADA_PHONE)
    created = portal.pending_events()
    change = {"subscriptionType": "contact.propertyChange", "objectId": int(ada)}
    odd = [
        hubspot_event(eventId=2, **change, propertyName=["email"], propertyValue="a@example.com"),
        hubspot_event(eventId=3, **change, propertyName={"name": "email"}),
        hubspot_event(eventId=4, **change, propertyName="email", propertyValue="\ud800@x.com"),
        hubspot_event(
            eventId=5, subscriptionType="contact.merge", primaryObjectId=int(ada), mergedObjectIds=5
        ),
        hubspot_event(
            eventId=6, subscriptionType="contact.privacyDeletion", objectId=9, mergedObjectIds=7
        ),
    ]
    response = await post_hubspot(portal.client, TEST_CLIENT_SECRET, [*created, *odd])
    assert response.json()["stored"] == len(created) + len(odd)
    await Worker(portal.services).drain()
    rows = await inbox_rows(portal.services.sessions)
    assert {(row.status, row.attempts, row.last_error) for row in rows} == {
        (EventStatus.done, 1, None)
    }
    assert await portal.lookup("phone", ADA_PHONE) == ada


@pytest.mark.parametrize("reverse", [False, True], ids=["privacy-first", "deletion-first"])
async def test_a_privacy_deletion_erases_the_contact_and_its_callers_details(
    portal: Portal, reverse: bool
) -> None:
    services = portal.services
    ada = await portal.create(phone=ADA_PHONE, email="ada@example.com")
    other = await portal.create(phone="+14155550177")
    await portal.crm(
        "PATCH",
        f"/crm/v3/objects/contacts/{ada}",
        {"properties": {"email": "ada@lovelace.example"}},
    )
    await portal.sync()
    # The receptionist's calls, one from Ada's phone and one from a stranger, still
    # pending when the privacy deletion is handled (they happened later).
    secret = portal.installed.webhook_secret
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()  # within the day allowed
    for event in (
        call_event(id="from-ada", occurred_at=later, caller={"phone": "(415) 555-0100"}),
        call_event(id="from-stranger", occurred_at=later, caller={"phone": "+14155550155"}),
    ):
        body = dumps(event)
        response = await portal.client.post(
            receptionist_path(PORTAL), content=body, headers=standard_headers(secret, body)
        )
        assert response.status_code == 202

    await portal.crm("POST", "/crm/v3/objects/contacts/gdpr-delete", {"objectId": ada})
    events = await portal.sync(reverse=reverse)
    assert events[0]["subscriptionType"] == (
        "contact.deletion" if reverse else "contact.privacyDeletion"
    )

    for kind, value in [("phone", ADA_PHONE), ("email", "ada@lovelace.example")]:
        assert await portal.lookup(kind, value) is None
    assert await portal.lookup("phone", "+14155550177") == other
    rows = await inbox_rows(services.sessions)
    about_ada = [r for r in rows if r.contact_id == ada]
    assert about_ada
    assert all(r.payload_ct is None for r in about_ada)
    [from_ada] = [r for r in rows if r.source == "receptionist" and r.contact_id == ada]
    assert (from_ada.status, from_ada.payload_ct) == (EventStatus.skipped, None)
    remaining = [read_payload(r, services.cipher) for r in rows if r.payload_ct is not None]
    assert "ada" not in repr(remaining).lower()
    assert "4155550100" not in repr(remaining)
    assert any(p.get("id") == "from-stranger" for p in remaining)
    async with services.sessions() as session:
        assert await identity.contact_hashes(PORTAL, ada, session=session) == set()
        assert await identity.erased_contacts(PORTAL, [ada], session=session) == {ada}

    # Anything arriving later about the erased contact is dropped with its payload.
    late = {
        "eventId": 901,
        "portalId": PORTAL,
        "appId": 424242,
        "occurredAt": 1_000_000_000_000,
        "subscriptionType": "contact.propertyChange",
        "objectId": int(ada),
        "propertyName": "email",
        "propertyValue": "ada@example.com",
        "attemptNumber": 0,
    }
    await post_hubspot(portal.client, TEST_CLIENT_SECRET, [late])
    await portal.sync()
    assert await portal.lookup("email", "ada@example.com") is None
    rows = await inbox_rows(services.sessions)
    assert all(r.payload_ct is None for r in rows if r.contact_id == ada)


async def test_erasing_a_contact_finishes_its_callers_pending_events(
    sessions: Any, cipher: Any
) -> None:
    await add_portal(sessions, cipher, PORTAL)
    when = datetime(2026, 3, 1, tzinfo=UTC)
    async with transaction(sessions) as session:
        await identity.set_identities(
            PORTAL, "51", phones=[ADA_PHONE], emails=[], session=session, cipher=cipher, as_of=when
        )
        await identity.remove_contact(PORTAL, "51", session=session, as_of=when)  # deleted first
        for key, phone in (("ada", ADA_PHONE), ("bob", "+14155550101")):
            await enqueue(
                NewEvent(
                    PORTAL,
                    EventSource.receptionist,
                    "call.completed",
                    key,
                    when,
                    {"id": key, "caller": {"phone": phone, "phone_e164": phone, "email": None}},
                ),
                session=session,
                cipher=cipher,
            )
    async with transaction(sessions) as session:
        purged = await erase_contact_data(PORTAL, "51", session=session, cipher=cipher)
    assert purged == 1
    ada, bob = await inbox_rows(sessions)
    assert (ada.payload_ct, ada.status, ada.contact_id) == (None, EventStatus.skipped, "51")
    assert ada.finished_at is not None
    assert bob.payload_ct is not None
    assert bob.status == EventStatus.pending


async def test_erasing_a_contact_drops_the_work_queued_for_it(sessions: Any, cipher: Any) -> None:
    """A note or an attendance queued for later names its contact and holds the caller's
    details: a privacy deletion erases those and finishes them, so neither reaches HubSpot."""
    await add_portal(sessions, cipher, PORTAL)
    when = datetime(2026, 3, 1, tzinfo=UTC)
    caller = {"phone": ADA_PHONE, "phone_e164": ADA_PHONE, "email": None}
    queued = [
        ("receptionist.note", "51", {"event_id": 7, "contact_id": "51", "event": caller}),
        ("campaigns.attendance", "51", {"campaign_id": "spring", "contact_id": "51"}),
        ("receptionist.note", "52", {"event_id": 8, "contact_id": "52", "event": caller}),
    ]
    async with transaction(sessions) as session:
        for number, (event_type, _, payload) in enumerate(queued):
            await enqueue(
                NewEvent(PORTAL, EventSource.internal, event_type, f"q{number}", when, payload),
                session=session,
                cipher=cipher,
            )
    async with transaction(sessions) as session:
        purged = await erase_contact_data(PORTAL, "51", session=session, cipher=cipher)
    assert purged == 2
    note, attendance, other = await inbox_rows(sessions)
    for erased in (note, attendance):
        assert (erased.payload_ct, erased.status) == (None, EventStatus.skipped)
    assert other.payload_ct is not None
    assert other.status == EventStatus.pending


async def test_a_privacy_deletion_goes_before_an_earlier_call_still_pending(
    portal: Portal,
) -> None:
    """A backlog (or a crashed worker's lease) can leave a call that happened before the
    deletion pending with it: handled first, in time order, it would recreate the person."""
    ada = await portal.create(phone=ADA_PHONE, firstname="Ada")
    await portal.sync()
    earlier = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    body = dumps(call_event(id="before-deletion", occurred_at=earlier, caller={"phone": ADA_PHONE}))
    response = await portal.client.post(
        receptionist_path(PORTAL),
        content=body,
        headers=standard_headers(portal.installed.webhook_secret, body),
    )
    assert response.status_code == 202
    await portal.crm("POST", "/crm/v3/objects/contacts/gdpr-delete", {"objectId": ada})

    delivered = await portal.sync()

    assert "contact.privacyDeletion" in [e["subscriptionType"] for e in delivered]
    [call] = [r for r in await inbox_rows(portal.services.sessions) if r.source == "receptionist"]
    assert (call.status, call.payload_ct) == (EventStatus.skipped, None)
    assert portal.state.contacts(PORTAL) == []  # nobody recreated
    assert portal.state.calls(PORTAL) == []


@pytest.mark.parametrize("dated", [True, False], ids=["dated-after", "undated"])
async def test_a_call_made_after_a_privacy_deletion_is_a_new_callers_even_waiting_with_it(
    portal: Portal, dated: bool
) -> None:
    """The person got in touch again after the deletion: with the worker idle that call
    makes a new contact, and so it must when it waits in the inbox with the deletion (a
    backlog, a stopped worker), instead of being erased as the deleted contact's. A call
    its sender did not date may be an older one arriving late: it is erased."""
    ada = await portal.create(phone=ADA_PHONE, firstname="Ada")
    await portal.sync()
    await portal.crm("POST", "/crm/v3/objects/contacts/gdpr-delete", {"objectId": ada})
    deletion = portal.pending_events()
    [deleted_at] = [
        e["occurredAt"] for e in deletion if e["subscriptionType"] == "contact.privacyDeletion"
    ]
    event = call_event(id="after-deletion", caller={"phone": ADA_PHONE})
    if dated:
        event["occurred_at"] = datetime.fromtimestamp(deleted_at / 1000 + 60, UTC).isoformat()
    else:
        del event["occurred_at"]
    body = dumps(event)
    response = await portal.client.post(
        receptionist_path(PORTAL),
        content=body,
        headers=standard_headers(portal.installed.webhook_secret, body),
    )
    assert response.status_code == 202
    assert (await post_hubspot(portal.client, TEST_CLIENT_SECRET, deletion)).status_code == 200

    await Worker(portal.services).drain()

    [call] = [r for r in await inbox_rows(portal.services.sessions) if r.source == "receptionist"]
    if not dated:
        assert (call.status, call.payload_ct) == (EventStatus.skipped, None)
        assert portal.state.contacts(PORTAL) == []  # nobody recreated
        return
    assert call.status == EventStatus.done
    [contact] = portal.state.contacts(PORTAL)
    assert contact.id != ada
    assert contact.properties["phone"] == ADA_PHONE
    assert len(portal.state.calls(PORTAL)) == 1
