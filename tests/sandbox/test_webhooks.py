"""Webhooks: what changes send, how they are signed, batched and retried."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac

import httpx
from asgi_lifespan import LifespanManager

from app.sandbox import SandboxConfig, create_sandbox_app
from app.sandbox.testing import DeferredASGITransport, install
from tests.sandbox.conftest import RECEIVER_URL, ReceivedWebhook, Receiver, Sandbox

CONTACTS = "/crm/v3/objects/contacts"


def verify_v3(secret: str, request: ReceivedWebhook) -> bool:
    """Hubline's side of the recipe, written independently of the sandbox's code."""
    timestamp = request.headers["x-hubspot-request-timestamp"]
    message = b"POST" + request.url.encode() + request.body + timestamp.encode()
    expected = base64.b64encode(hmac.new(secret.encode(), message, hashlib.sha256).digest())
    return hmac.compare_digest(expected.decode(), request.headers["x-hubspot-signature-v3"])


async def test_contact_changes_arrive_signed_with_hubspots_fields(sandbox: Sandbox) -> None:
    sandbox.deliver_webhooks()
    headers = await sandbox.token()
    created = await sandbox.client.post(
        CONTACTS, json={"properties": {"email": "ada@example.com"}}, headers=headers
    )
    contact_id = created.json()["id"]
    await sandbox.client.patch(
        f"{CONTACTS}/{contact_id}", json={"properties": {"firstname": "Ada"}}, headers=headers
    )
    await sandbox.client.delete(f"{CONTACTS}/{contact_id}", headers=headers)

    await sandbox.webhooks_idle()

    request = sandbox.receiver.received[0]
    assert request.url == RECEIVER_URL
    assert verify_v3(sandbox.config.client_secret, request)
    v1 = hashlib.sha256(sandbox.config.client_secret.encode() + request.body).hexdigest()
    assert request.headers["x-hubspot-signature"] == v1
    assert request.headers["x-hubspot-signature-version"] == "v1"
    events = sandbox.receiver.events()
    # The app subscribed property changes of phone, mobilephone and email only.
    assert [(e["subscriptionType"], e.get("propertyName")) for e in events] == [
        ("contact.creation", None),
        ("contact.propertyChange", "email"),
        ("contact.deletion", None),
    ]
    creation = events[0]
    assert creation["objectId"] == int(contact_id)
    assert creation["portalId"] == 1001
    assert creation["appId"] == sandbox.config.app_id
    assert creation["attemptNumber"] == 0
    assert creation["changeSource"] == "INTEGRATION"
    assert creation["changeFlag"] == "NEW"
    assert creation["occurredAt"] == int(sandbox.clock.now * 1000)
    assert {"eventId", "subscriptionId", "sourceId"} <= creation.keys()
    assert events[1]["propertyValue"] == "ada@example.com"


async def test_property_changes_follow_the_apps_subscriptions(sandbox: Sandbox) -> None:
    sandbox.deliver_webhooks()
    headers = await sandbox.token()
    wrong = await sandbox.client.post("/_sandbox/settings", json={"webhook_properties": [1]})
    assert wrong.status_code == 400
    assert wrong.json()["wrong_type"] == ["webhook_properties"]
    subscribe_all = await sandbox.client.post(
        "/_sandbox/settings", json={"webhook_properties": None}
    )
    assert subscribe_all.json()["webhook_properties"] is None
    await sandbox.client.post(
        CONTACTS,
        json={"properties": {"email": "ada@example.com", "firstname": "Ada"}},
        headers=headers,
    )
    await sandbox.client.post("/_sandbox/settings", json={"webhook_properties": ["firstname"]})
    await sandbox.client.post(
        CONTACTS,
        json={"properties": {"email": "grace@example.com", "firstname": "Grace"}},
        headers=headers,
    )

    await sandbox.webhooks_idle()
    changes = [
        (e["propertyName"], e["propertyValue"], e["subscriptionId"])
        for e in sandbox.receiver.events()
        if e["subscriptionType"] == "contact.propertyChange"
    ]
    assert [(name, value) for name, value, _ in changes] == [
        ("email", "ada@example.com"),
        ("firstname", "Ada"),
        ("firstname", "Grace"),
    ]
    assert changes[0][2] != changes[1][2], "one subscription per property"


async def test_changes_made_together_are_batched_up_to_100_events(sandbox: Sandbox) -> None:
    sandbox.deliver_webhooks()
    headers = await sandbox.token()
    inputs = [{"properties": {"email": f"p{i}@example.com"}} for i in range(75)]
    # 75 creations and 75 property changes: 150 events, so two requests.
    await sandbox.client.post(f"{CONTACTS}/batch/create", json={"inputs": inputs}, headers=headers)

    await sandbox.webhooks_idle()

    sizes = [len(r.events()) for r in sandbox.receiver.received]
    assert sorted(sizes) == [50, 100]


async def test_failed_deliveries_are_retried_with_increasing_attempt_numbers(
    sandbox: Sandbox,
) -> None:
    sandbox.deliver_webhooks()
    sandbox.receiver.statuses = [500, 429]
    headers = await sandbox.token()
    await sandbox.client.post(CONTACTS, json={"properties": {}}, headers=headers)

    await sandbox.webhooks_idle()

    attempts = [[e["attemptNumber"] for e in r.events()] for r in sandbox.receiver.received]
    assert attempts == [[0], [1], [2]]
    event_ids = {r.events()[0]["eventId"] for r in sandbox.receiver.received}
    assert len(event_ids) == 1, "a retry resends the same event"
    deliveries = [(d.attempt, d.status) for d in sandbox.state.webhook_deliveries]
    assert deliveries == [(0, 500), (1, 429), (2, 204)]


async def test_retries_stop_after_the_configured_number(sandbox: Sandbox) -> None:
    sandbox.deliver_webhooks()
    sandbox.config.webhook_max_retries = 2
    sandbox.receiver.statuses = [503] * 10
    headers = await sandbox.token()
    await sandbox.client.post(CONTACTS, json={"properties": {}}, headers=headers)

    await sandbox.webhooks_idle()

    assert len(sandbox.receiver.received) == 3
    assert sandbox.state.webhook_deliveries[-1].status == 503


async def test_a_receiver_that_times_out_is_retried(sandbox: Sandbox) -> None:
    sandbox.deliver_webhooks()
    sandbox.config.webhook_timeout = 0.05
    sandbox.config.webhook_max_retries = 1
    sandbox.receiver.hang_seconds = 0.2
    headers = await sandbox.token()
    await sandbox.client.post(CONTACTS, json={"properties": {}}, headers=headers)

    await sandbox.webhooks_idle()

    assert [d.error for d in sandbox.state.webhook_deliveries] == ["TimeoutError", "TimeoutError"]


async def test_privacy_deletion_sends_privacy_deletion_and_deletion(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    created = await sandbox.client.post(CONTACTS, json={"properties": {}}, headers=headers)
    sandbox.deliver_webhooks()

    await sandbox.client.post(
        f"{CONTACTS}/gdpr-delete", json={"objectId": created.json()["id"]}, headers=headers
    )
    await sandbox.webhooks_idle()

    assert sorted(e["subscriptionType"] for e in sandbox.receiver.events()) == [
        "contact.deletion",
        "contact.privacyDeletion",
    ]


async def test_merge_event_names_the_primary_and_merged_ids(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    first = await sandbox.client.post(CONTACTS, json={"properties": {}}, headers=headers)
    second = await sandbox.client.post(CONTACTS, json={"properties": {}}, headers=headers)
    sandbox.deliver_webhooks()

    await sandbox.client.post(
        f"{CONTACTS}/merge",
        json={"primaryObjectId": first.json()["id"], "objectIdToMerge": second.json()["id"]},
        headers=headers,
    )
    await sandbox.webhooks_idle()

    merge = next(e for e in sandbox.receiver.events() if e["subscriptionType"] == "contact.merge")
    assert merge["primaryObjectId"] == int(first.json()["id"])
    assert merge["mergedObjectIds"] == [int(second.json()["id"])]
    assert merge["newObjectId"] == int(first.json()["id"])


async def test_ui_changes_are_reported_as_crm_ui(sandbox: Sandbox) -> None:
    await sandbox.install(1001)
    sandbox.deliver_webhooks()

    await sandbox.client.post("/portals/1001/contacts", data={"firstname": "Ada"})
    await sandbox.webhooks_idle()

    assert {e["changeSource"] for e in sandbox.receiver.events()} == {"CRM_UI"}


async def test_portals_without_the_app_send_nothing(sandbox: Sandbox) -> None:
    sandbox.deliver_webhooks()

    await sandbox.client.post("/portals/1002/contacts", data={"firstname": "Ada"})
    await sandbox.webhooks_idle()

    assert sandbox.receiver.received == []
    assert len(sandbox.state.contacts(1002)) == 1


async def test_deferred_transport_delivers_to_an_app_wired_in_later(
    sandbox_config: SandboxConfig,
) -> None:
    receiver = Receiver()
    transport = DeferredASGITransport()
    sandbox_config.webhook_target_url = RECEIVER_URL
    app = create_sandbox_app(sandbox_config, webhook_transport=transport)
    transport.app = receiver.app()
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://s"
        ) as client,
    ):
        tokens = await install(client, sandbox_config, 1001)
        await client.post(
            CONTACTS,
            json={"properties": {}},
            headers={"Authorization": f"Bearer {tokens['access_token']}"},
        )
        async with asyncio.timeout(5):
            await app.state.sandbox.dispatcher.idle()

    assert [e["subscriptionType"] for e in receiver.events()] == ["contact.creation"]
