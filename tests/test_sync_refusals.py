"""HubSpot refusing part of a sync: the rest of the batch still lands, on SQLite and PostgreSQL.

Events go in through the real receptionist route and are synced by a real Worker; HubSpot is
the sandbox, made to misbehave through its own state: faults, things deleted or changed as a
person would in HubSpot, and installs without a scope.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlmodel import col

from app.models import EventStatus, InboxEvent
from app.properties import GROUP_LABEL, GROUP_NAME, OPTIONS_SCOPE_PROBLEM, SPECS, problem_code
from app.sandbox.limits import Fault
from app.sandbox.properties import PropertyGroup
from app.sandbox.schemas import create_property
from app.settings import Settings
from tests.sync_support import (
    call,
    drain,
    drain_through,
    inbox_events,
    person_contact,
    post_event,
)
from tests.test_properties import problems

CONTACT_SCOPES = "oauth crm.objects.contacts.read crm.objects.contacts.write"
# The portal lets Hubline read its properties but not change them.
SCHEMA_READ_ONLY = f"{CONTACT_SCOPES} crm.schemas.contacts.read"


@pytest.fixture
def hubspot_scopes() -> str | None:
    """HUBSPOT_SCOPES of the deployment; a test parametrizes it to install with fewer."""
    return None


@pytest.fixture
def settings(make_settings: Callable[..., Settings], hubspot_scopes: str | None) -> Settings:
    if hubspot_scopes is None:
        return make_settings()
    return make_settings(hubspot_scopes=hubspot_scopes)


def properties_made_earlier(sandbox: Any, portal_id: int) -> None:
    """Hubline's properties as an earlier install with every scope left them."""
    world = sandbox.portal(portal_id)
    world.groups["contacts"].setdefault(GROUP_NAME, PropertyGroup(GROUP_NAME, GROUP_LABEL))
    for spec in SPECS:
        create_property(world, "contacts", spec.definition("AI Receptionist"), sandbox.now())


def remove_option(sandbox: Any, portal_id: int, name: str, value: str) -> None:
    """An admin deletes one option of a dropdown in HubSpot's settings."""
    prop = sandbox.portal(portal_id).properties["contacts"][name]
    prop.options = [o for o in prop.options if o["value"] != value]


async def unfinished_events(services: Any) -> list[InboxEvent]:
    async with services.sessions() as session:
        rows = await session.execute(
            sa.select(InboxEvent).where(col(InboxEvent.status) != EventStatus.done)
        )
        return list(rows.scalars())


def by_phone(sandbox: Any, portal_id: int) -> dict[str, Any]:
    return {c.properties.get("phone"): c for c in sandbox.contacts(portal_id)}


def requests_to(sandbox: Any, portal_id: int, suffix: str) -> int:
    return sum(
        n
        for (pid, endpoint, _), n in sandbox.request_counts.items()
        if pid == portal_id and endpoint.endswith(suffix)
    )


# --- campaigns ----------------------------------------------------------------------------


async def test_a_marketing_event_deleted_in_hubspot_is_made_again_and_the_batch_syncs(
    client: Any, install_portal: Any, services: Any, sandbox: Any
) -> None:
    portal = await install_portal(1001)
    await post_event(client, portal, call(campaign_id="spring"))
    await drain(services)
    world = sandbox.portal(1001)
    assert len(world.marketing_events) == 1
    world.marketing_events.clear()  # someone deleted it in HubSpot; Hubline remembers it

    grace = {"name": "Grace Hopper", "phone": "+1 415 555 0142"}
    await post_event(client, portal, call(caller=grace, campaign_id="spring"))
    alan = {"name": "Alan Turing", "phone": "+1 415 555 0199"}
    await post_event(client, portal, call(caller=alan))  # no campaign
    await drain(services)

    assert await unfinished_events(services) == []
    assert [e.attempts for e in await inbox_events(services)] == [1, 1, 1]
    [event] = world.marketing_events.values()
    assert event.external_event_id == "spring"
    attended = [a for a in world.attendance if a.external_event_id == "spring"]
    assert by_phone(sandbox, 1001)["+14155550142"].id in {a.contact_id for a in attended}
    assert len(sandbox.calls(1001)) == 3


async def test_a_failing_marketing_endpoint_neither_fails_nor_redoes_the_synced_calls(
    client: Any, install_portal: Any, services: Any, sandbox: Any
) -> None:
    portal = await install_portal(1001)
    await drain(services)  # provisioning
    # The marketing events API is down for a while: the sync's own try and the first
    # try after it both meet a 503.
    sandbox.faults.append(
        Fault(count=2, status=503, portal_id=1001, path_prefix="/marketing/v3/marketing-events")
    )
    ada = {"name": "Ada Lovelace", "phone": "+1 415 555 0100"}
    await post_event(client, portal, call(caller=ada, campaign_id="spring"))
    alan = {"name": "Alan Turing", "phone": "+1 415 555 0199"}
    await post_event(client, portal, call(caller=alan))  # no campaign
    await drain(services)

    events = await inbox_events(services)
    assert [(e.status, e.attempts) for e in events] == [(EventStatus.done, 1)] * 2
    assert await unfinished_events(services) == []
    assert len(sandbox.calls(1001)) == 2  # nothing made twice
    assert requests_to(sandbox, 1001, "/calls/batch/create") == 1
    world = sandbox.portal(1001)
    [event] = world.marketing_events.values()
    assert event.external_event_id == "spring"
    [attended] = world.attendance  # recorded once HubSpot answered again
    assert attended.contact_id == by_phone(sandbox, 1001)["+14155550100"].id


# --- call_outcome ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hubspot_scopes", [SCHEMA_READ_ONLY, CONTACT_SCOPES], ids=["schema-read-only", "no-schema"]
)
async def test_a_new_outcome_without_the_schema_scope_is_reported_and_the_rest_syncs(
    client: Any, install_portal: Any, services: Any, sandbox: Any
) -> None:
    properties_made_earlier(sandbox, 1001)
    portal = await install_portal(1001)
    await drain(services)  # provisioning
    ada = {"name": "Ada Lovelace", "phone": "+1 415 555 0100"}
    await post_event(client, portal, call(caller=ada, outcome="Left a Voicemail"))
    alan = {"name": "Alan Turing", "phone": "+1 415 555 0199"}
    await post_event(client, portal, call(caller=alan, outcome="Message taken"))
    await drain(services)

    assert [e.status for e in await inbox_events(services)] == [EventStatus.done] * 2
    contacts = by_phone(sandbox, 1001)
    ada_props = contacts["+14155550100"].properties
    assert ada_props["ai_call_summary"] == "Wants a cleaning appointment next week"
    assert "call_outcome" not in ada_props  # the new outcome could not be added
    assert contacts["+14155550199"].properties["call_outcome"] == "message_taken"
    assert len(sandbox.calls(1001)) == 2
    options = sandbox.portal(1001).properties["contacts"]["call_outcome"].option_values()
    assert "left_a_voicemail" not in options
    assert OPTIONS_SCOPE_PROBLEM in await problems(services, 1001)


class RepairAfterBothRefusals(httpx.AsyncBaseTransport):
    """The sandbox, except that reading call_outcome (the repair) waits until the batch's
    contact create and contact update were both refused: both went out before the repair
    landed, as they can when they run together."""

    def __init__(self, app: Any) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.refused: set[str] = set()
        self.both_refused = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "GET" and path.endswith("/properties/contacts/call_outcome"):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.both_refused.wait(), timeout=5)
        response = await self.inner.handle_async_request(request)
        if response.status_code == 400 and path.endswith(WRITES):
            self.refused.add(path)
            if len(self.refused) == len(WRITES):
                self.both_refused.set()
        return response


WRITES = ("/crm/v3/objects/contacts/batch/create", "/crm/v3/objects/contacts/batch/update")


async def test_an_option_removed_under_both_concurrent_writes_is_repaired_for_both(
    client: Any,
    install_portal: Any,
    services: Any,
    sandbox: Any,
    sandbox_app: Any,
    settings: Settings,
) -> None:
    portal = await install_portal(1001)
    await drain(services)  # provisioning
    known = person_contact(sandbox, 1001, firstname="Kim", phone="+1 415 555 0111")
    remove_option(sandbox, 1001, "call_outcome", "message_taken")
    # One batch: the known contact's update and the new caller's create go out together
    # and both meet the removed option.
    kim = {"name": "Kim Lee", "phone": "+1 415 555 0111"}
    await post_event(client, portal, call(caller=kim, outcome="Message taken"))
    ada = {"name": "Ada Lovelace", "phone": "+1 415 555 0100"}
    await post_event(client, portal, call(caller=ada, outcome="Message taken"))
    transport = RepairAfterBothRefusals(sandbox_app)
    await drain_through(settings, transport)

    assert transport.both_refused.is_set()
    assert [e.status for e in await inbox_events(services)] == [EventStatus.done] * 2
    assert known.properties["call_outcome"] == "message_taken"
    assert by_phone(sandbox, 1001)["+14155550100"].properties["call_outcome"] == "message_taken"
    options = sandbox.portal(1001).properties["contacts"]["call_outcome"].option_values()
    assert "message_taken" in options
    assert len(sandbox.calls(1001)) == 2


# --- lead_source ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hubspot_scopes", "repairable"),
    [(None, True), (SCHEMA_READ_ONLY, False)],
    ids=["repaired", "cannot-repair"],
)
async def test_a_removed_lead_source_option_is_repaired_or_left_out_and_callers_sync(
    client: Any, install_portal: Any, services: Any, sandbox: Any, repairable: bool
) -> None:
    properties_made_earlier(sandbox, 1001)
    portal = await install_portal(1001)
    await drain(services)  # provisioning
    known = person_contact(sandbox, 1001, firstname="Kim", phone="+1 415 555 0111")
    remove_option(sandbox, 1001, "lead_source", "ai_receptionist")  # an admin tidied up
    # A new caller (created with lead_source) and a known contact without one (filled in).
    ada = {"name": "Ada Lovelace", "phone": "+1 415 555 0100"}
    await post_event(client, portal, call(caller=ada))
    kim = {"name": "Kim Lee", "phone": "+1 415 555 0111"}
    await post_event(client, portal, call(caller=kim))
    await drain(services)

    assert [e.status for e in await inbox_events(services)] == [EventStatus.done] * 2
    new = by_phone(sandbox, 1001)["+14155550100"].properties
    assert new["firstname"] == "Ada"
    assert new["ai_call_summary"] == "Wants a cleaning appointment next week"
    assert known.properties["ai_call_summary"] == "Wants a cleaning appointment next week"
    assert len(sandbox.calls(1001)) == 2
    options = sandbox.portal(1001).properties["contacts"]["lead_source"].option_values()
    found = await problems(services, 1001)
    if repairable:
        assert "ai_receptionist" in options
        assert new["lead_source"] == known.properties["lead_source"] == "ai_receptionist"
        assert problem_code("lead_source") not in found
    else:
        assert "ai_receptionist" not in options
        assert "lead_source" not in new
        assert "lead_source" not in known.properties
        assert problem_code("lead_source") in found
