"""HubSpot's app webhook: signature v3 at the edge, one transaction per batch, repeats ignored."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.routing import Route

from app.campaigns import ATTENDANCE_EVENT
from app.contacts import CONTACT_EVENT_TYPES
from app.crypto import Secret
from app.inbox import read_payload, registry
from app.lifecycle import PROVISION_EVENT, UNINSTALL_EVENT
from app.main import close_services, create_app, open_services
from app.models import EventStatus, PortalStatus
from app.settings import Settings
from app.sync import NOTE_LATER, RECEPTIONIST_TYPES
from app.webhooks import hubspot_endpoint
from tests.conftest import TEST_CLIENT_SECRET
from tests.outage import database_outage
from tests.webhook_support import (
    HUBSPOT_PATH,
    add_portal,
    call_event,
    dumps,
    hubspot_event,
    hubspot_headers,
    inbox_rows,
    post_hubspot,
    receptionist_path,
    standard_headers,
)

PORTAL = 1001
URL = "http://hubline.test" + HUBSPOT_PATH


@pytest.fixture
async def portal(services: Any) -> Secret:
    return await add_portal(services.sessions, services.cipher, PORTAL)


async def test_a_signed_batch_is_stored_as_inbox_events(
    client: httpx.AsyncClient, portal: Secret, services: Any
) -> None:
    events = [
        hubspot_event(eventId=1, objectId=51),
        hubspot_event(
            eventId=2,
            objectId=51,
            subscriptionType="contact.propertyChange",
            propertyName="phone",
            propertyValue="+1 415 555 0100",
        ),
    ]
    response = await post_hubspot(client, TEST_CLIENT_SECRET, events)
    assert response.status_code == 200
    assert response.json() == {"stored": 2, "duplicates": 0, "ignored": 0}
    rows = await inbox_rows(services.sessions)
    assert [(r.source, r.type, r.status) for r in rows] == [
        ("hubspot", "contact.creation", EventStatus.pending),
        ("hubspot", "contact.propertyChange", EventStatus.pending),
    ]
    assert rows[0].occurred_at.timestamp() == 1_767_225_600
    assert read_payload(rows[1], services.cipher) == events[1]


async def test_a_retry_with_a_higher_attempt_number_is_the_same_event(
    client: httpx.AsyncClient, portal: Secret, services: Any
) -> None:
    for attempt in range(5):
        response = await post_hubspot(
            client, TEST_CLIENT_SECRET, [hubspot_event(attemptNumber=attempt)]
        )
        assert response.status_code == 200
    assert response.json() == {"stored": 0, "duplicates": 1, "ignored": 0}
    assert len(await inbox_rows(services.sessions)) == 1


async def test_the_same_event_twenty_times_at_once_is_stored_once(
    client: httpx.AsyncClient, portal: Secret, services: Any
) -> None:
    responses = await asyncio.gather(
        *(
            post_hubspot(client, TEST_CLIENT_SECRET, [hubspot_event(attemptNumber=i)])
            for i in range(20)
        )
    )
    assert {r.status_code for r in responses} == {200}
    assert sum(r.json()["stored"] for r in responses) == 1
    assert len(await inbox_rows(services.sessions)) == 1


async def test_property_changes_with_different_values_are_different_events(
    client: httpx.AsyncClient, portal: Secret, services: Any
) -> None:
    change = {"subscriptionType": "contact.propertyChange"}
    events = [
        hubspot_event(**change, propertyName="email", propertyValue="a@example.com"),
        hubspot_event(**change, propertyName="email", propertyValue="b@example.com"),
        hubspot_event(**change, propertyName="phone", propertyValue="a@example.com"),
    ]
    response = await post_hubspot(client, TEST_CLIENT_SECRET, events)
    assert response.json()["stored"] == 3


async def test_events_not_for_an_installed_portal_of_this_app_are_acknowledged_and_ignored(
    make_settings: Callable[..., Settings], sandbox_app: Any
) -> None:
    app_settings = make_settings(hubspot_app_id="424242")
    async with _hubline(app_settings, sandbox_app) as (client, resources):
        await add_portal(resources.sessions, resources.cipher, PORTAL)
        await add_portal(
            resources.sessions, resources.cipher, 1002, status=PortalStatus.uninstalled
        )
        await add_portal(
            resources.sessions, resources.cipher, 1003, status=PortalStatus.needs_reauth
        )
        events = [
            hubspot_event(portalId=9999),
            hubspot_event(portalId=1002),
            hubspot_event(portalId=PORTAL, appId=1),
            hubspot_event(portalId=PORTAL, appId="424242"),
            hubspot_event(portalId=1003),
            # No portal has an id past BIGINT: the database is not even asked about them.
            hubspot_event(portalId=2**63),
            hubspot_event(portalId=str(10**30)),
        ]
        response = await post_hubspot(client, TEST_CLIENT_SECRET, events)
        assert response.status_code == 200
        assert response.json() == {"stored": 2, "duplicates": 0, "ignored": 5}
        rows = await inbox_rows(resources.sessions)
        assert [(r.portal_id, r.status) for r in rows] == [
            (PORTAL, EventStatus.pending),
            (1003, EventStatus.parked),
        ]


async def test_only_the_contact_subscriptions_hubline_handles_are_stored(
    client: httpx.AsyncClient, portal: Secret, services: Any
) -> None:
    """The worker picks a handler by type, and Hubline's own types uninstall, provision or
    sync: one named in HubSpot's webhook, however well signed, is acknowledged and
    dropped, as a subscription Hubline does not use is."""
    own = [UNINSTALL_EVENT, PROVISION_EVENT, ATTENDANCE_EVENT, NOTE_LATER, *RECEPTIONIST_TYPES]
    # Every type a handler of Hubline's takes is one of those or a contact subscription
    # (tests register handlers of their own, named test.*).
    others_registered = registry.types - {*own, *CONTACT_EVENT_TYPES}
    assert all(event_type.startswith("test.") for event_type in others_registered)
    others = [*own, "deal.creation"]
    events = [hubspot_event(eventId=1)] + [
        hubspot_event(eventId=number, subscriptionType=event_type)
        for number, event_type in enumerate(others, start=2)
    ]
    response = await post_hubspot(client, TEST_CLIENT_SECRET, events)
    assert response.status_code == 200
    assert response.json() == {"stored": 1, "duplicates": 0, "ignored": len(others)}
    rows = await inbox_rows(services.sessions)
    assert [(r.source, r.type) for r in rows] == [("hubspot", "contact.creation")]


async def test_every_bad_input_gets_its_answer_and_stores_nothing(
    client: httpx.AsyncClient, portal: Secret, services: Any
) -> None:
    good = dumps([hubspot_event()])
    signed = hubspot_headers(TEST_CLIENT_SECRET, URL, good)
    stale = hubspot_headers(TEST_CLIENT_SECRET, URL, good, timestamp_ms=1_000_000_000_000)
    malformed = b'[{"portalId": 1001,'
    not_events = dumps({"portalId": PORTAL})
    bad_event = dumps([hubspot_event(portalId="one"), "x"])
    too_many = dumps([hubspot_event(eventId=i) for i in range(101)])
    big = b"[" + b" " * (1024 * 1024) + b"]"
    cases: list[tuple[str, int, bytes, dict[str, str]]] = [
        ("no signature", 401, good, {}),
        ("bad signature", 401, good, hubspot_headers("another-secret", URL, good)),
        (
            "signature of another URL",
            401,
            good,
            hubspot_headers(TEST_CLIENT_SECRET, URL + "x", good),
        ),
        ("signature of another body", 401, good + b" ", signed),
        ("stale signature", 401, good, stale),
        (
            "garbage headers",
            401,
            good,
            {"X-HubSpot-Signature-v3": "not base64!!", "X-HubSpot-Request-Timestamp": "soon"},
        ),
        ("unsigned malformed JSON", 401, malformed, {}),
        ("signed malformed JSON", 400, malformed, _signed(malformed)),
        ("signed object, not array", 400, not_events, _signed(not_events)),
        ("signed unusable event", 400, bad_event, _signed(bad_event)),
        ("more than 100 events", 400, too_many, _signed(too_many)),
        ("oversized body", 413, big, _signed(big)),
    ]
    for name, status, body, headers in cases:
        response = await client.post(HUBSPOT_PATH, content=body, headers=headers)
        assert response.status_code == status, name
        assert set(response.json()) == {"error", "detail"}, name
        assert await inbox_rows(services.sessions) == [], name


async def test_a_batch_keeps_its_readable_events_and_says_which_it_cannot_read(
    client: httpx.AsyncClient, portal: Secret, services: Any
) -> None:
    # Refused whole for one event it cannot read, a batch was retried by HubSpot for a
    # day and then dropped, its readable events with it. Neither unreadable event here
    # may be a 500 either: a time no datetime holds, a number past what int() reads.
    batch = dumps(
        [
            hubspot_event(),
            hubspot_event(eventId=2, occurredAt=-(10**15)),
            hubspot_event(eventId=3, portalId="9" * 5000),
        ]
    )
    response = await client.post(HUBSPOT_PATH, content=batch, headers=_signed(batch))
    assert response.status_code == 200
    answer = response.json()
    assert (answer["stored"], answer["unreadable"]) == (1, 2)
    assert [p["field"] for p in answer["problems"]] == ["[1].occurredAt", "[2].portalId"]
    assert len(await inbox_rows(services.sessions)) == 1


def _signed(body: bytes) -> dict[str, str]:
    return hubspot_headers(TEST_CLIENT_SECRET, URL, body)


# --- hubspot.md's test vector, through the route, with the clock frozen ---------------------

VECTOR_SECRET = "yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy"
VECTOR_HEADERS = {
    "X-HubSpot-Signature-v3": "K36dawei4A+QBNolUOqo7s91KQDWQ5MXZ/QufNYuk/Y=",
    "X-HubSpot-Request-Timestamp": "1693657560000",
}
VECTOR_BODY = b"{'example_field':'example_value'}"


@pytest.mark.parametrize(("now", "status"), [(1693657560.0, 400), (1693657560.0 + 301, 401)])
async def test_the_hubspot_test_vector_verifies_through_the_route(
    make_settings: Callable[..., Settings], now: float, status: int
) -> None:
    # The vector's URL is https://www.example.com/webhook_uri, so the endpoint is mounted
    # there. Its body is not JSON: a 400 (not a 401) shows the signature was accepted.
    vector_settings = make_settings(
        public_url="https://www.example.com", hubspot_client_secret=VECTOR_SECRET
    )
    resources = await open_services(vector_settings)
    app = Starlette(routes=[Route("/webhook_uri", hubspot_endpoint(lambda: now), methods=["POST"])])
    app.state.services = resources
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://internal:8000"
        ) as client:
            response = await client.post(
                "/webhook_uri", content=VECTOR_BODY, headers=VECTOR_HEADERS
            )
    finally:
        await close_services(resources)
    assert response.status_code == status
    assert response.json()["error"] == ("malformed_json" if status == 400 else "invalid_signature")


# --- arbitrary requests through the routes --------------------------------------------------

_headers = st.dictionaries(
    st.sampled_from(
        [
            "x-hubspot-signature-v3",
            "x-hubspot-request-timestamp",
            "webhook-id",
            "webhook-timestamp",
            "webhook-signature",
            "authorization",
        ]
    ),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60),
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    headers=_headers,
    body=st.binary(max_size=300),
    route=st.sampled_from(["hubspot", "receptionist"]),
)
async def test_arbitrary_requests_are_401_and_store_nothing(
    client: httpx.AsyncClient,
    portal: Secret,
    services: Any,
    headers: dict[str, str],
    body: bytes,
    route: str,
) -> None:
    path = HUBSPOT_PATH if route == "hubspot" else receptionist_path(PORTAL)
    response = await client.post(path, content=body, headers=headers)
    assert response.status_code == 401
    assert await inbox_rows(services.sessions) == []


async def test_a_flipped_byte_through_the_route_is_401(
    client: httpx.AsyncClient, portal: Secret, services: Any
) -> None:
    body = dumps([hubspot_event()])
    headers = _signed(body)
    stamp = headers["X-HubSpot-Request-Timestamp"]
    flipped_stamp = stamp[:-1] + str((int(stamp[-1]) + 1) % 10)
    for changed_body, changed_headers in [
        (body.replace(b"1001", b"1002"), headers),
        (body, {**headers, "X-HubSpot-Request-Timestamp": flipped_stamp}),
    ]:
        response = await client.post(HUBSPOT_PATH, content=changed_body, headers=changed_headers)
        assert response.status_code == 401
    response = await client.post(HUBSPOT_PATH + "?x=1", content=body, headers=headers)
    assert response.status_code == 401
    assert await inbox_rows(services.sessions) == []


# --- the database stops answering -----------------------------------------------------------


async def test_when_the_database_is_down_webhooks_answer_503_then_accept_again(
    client: httpx.AsyncClient, portal: Secret, services: Any, database_url: str
) -> None:
    receptionist_body = dumps(call_event())
    hubspot_body = dumps([hubspot_event()])

    async def deliver() -> tuple[int, int]:
        first = await client.post(
            receptionist_path(PORTAL),
            content=receptionist_body,
            headers=standard_headers(portal, receptionist_body),
        )
        second = await client.post(
            HUBSPOT_PATH, content=hubspot_body, headers=_signed(hubspot_body)
        )
        return first.status_code, second.status_code

    async with database_outage(services.engine, database_url):
        assert await deliver() == (503, 503)
        assert await deliver() == (503, 503)
    assert await inbox_rows(services.sessions) == []
    assert await deliver() == (202, 200)
    assert len(await inbox_rows(services.sessions)) == 2


# --- helpers --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _hubline(
    app_settings: Settings, sandbox_app: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """Hubline with these settings, and a client to it."""
    app = create_app(app_settings, transport=httpx.ASGITransport(app=sandbox_app))
    async with (
        LifespanManager(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://hubline.test"
        ) as client,
    ):
        yield client, app.state.services
