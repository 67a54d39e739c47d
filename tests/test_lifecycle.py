"""A portal's life against the sandbox: uninstall signals, reinstall, scopes, disconnect."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from asgi_lifespan import LifespanManager
from sqlmodel import col

from app import db, identity
from app.crypto import generate_key
from app.db import transaction
from app.errors import (
    ClientRefused,
    HubSpotNotReached,
    PortalUnavailable,
    RefreshRejected,
    UnknownKeyError,
)
from app.hubspot import hubspot_client
from app.inbox import EventView, HandlerContext, NewEvent, enqueue, registry
from app.lifecycle import (
    UNINSTALL_EVENT,
    apply_uninstall,
    check_scopes,
    disconnect,
    poll_journal,
)
from app.main import close_services, create_app, open_services
from app.models import (
    PRIVACY_DELETION,
    AppState,
    EventSource,
    EventStatus,
    IdentityEntry,
    InboxEvent,
    OAuthToken,
    Portal,
    PortalProblem,
    PortalStatus,
    utcnow,
)
from app.portals import list_problems, record_problem
from app.sandbox.limits import Fault
from app.sandbox.objects import privacy_delete_contact, update_object
from app.sandbox.state import UI_SOURCE
from app.tokens import load_tokens
from app.worker import Worker, _retention
from tests.conftest import (
    HUBLINE_URL,
    SANDBOX_URL,
    TEST_CLIENT_SECRET,
    approve_in_sandbox,
    settings_page_value,
)
from tests.support_hubline import fast_backoff, until_waiting_on_locks
from tests.sync_support import call, person_contact, post_event
from tests.webhook_support import post_hubspot

CONTACTS = "/crm/v3/objects/contacts"
PROBE = "test.lifecycle_probe"
delivered: list[tuple[int, int]] = []


@registry.handler(PROBE)
async def probe(ctx: HandlerContext, events: list[EventView]) -> None:
    """A stand-in for real work: it needs the portal's token to work."""
    await hubspot_client(ctx.services, ctx.portal_id).get_json(CONTACTS)
    delivered.extend((event.portal_id, event.id) for event in events)


@pytest.fixture(autouse=True)
def _forget_deliveries() -> None:
    delivered.clear()


async def enqueue_probe(services: Any, portal_id: int, key: str) -> int:
    async with transaction(services.sessions) as session:
        enqueued = await enqueue(
            NewEvent(
                portal_id=portal_id,
                source=EventSource.internal,
                type=PROBE,
                idempotency_key=key,
                occurred_at=utcnow(),
            ),
            session=session,
            cipher=services.cipher,
        )
    return enqueued.event_id


async def drain(services: Any) -> None:
    await Worker(services, poll_seconds=0.02).drain(timeout=20)


async def uninstall_in_sandbox(sandbox_app: Any, portal_id: int) -> None:
    """The customer uninstalls the app in HubSpot (the sandbox's control endpoint)."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=sandbox_app), base_url=SANDBOX_URL
    ) as hubspot:
        answer = await hubspot.post(f"/_sandbox/portals/{portal_id}/uninstall")
    assert answer.status_code < 300, answer.text


async def portal_state(services: Any, portal_id: int) -> tuple[str, bool]:
    async with services.sessions() as session:
        portal = await session.get(Portal, portal_id, populate_existing=True)
        tokens = await load_tokens(portal_id, session=session, cipher=services.cipher)
    assert portal is not None
    return portal.status, tokens is not None


async def event_status(services: Any, event_id: int) -> str:
    async with services.sessions() as session:
        event = await session.get(InboxEvent, event_id, populate_existing=True)
    assert event is not None
    return event.status


def requests_for(sandbox: Any, portal_id: int) -> int:
    return sum(1 for r in sandbox.request_log if r.portal_id == portal_id)


async def assert_no_more_calls(services: Any, sandbox: Any, portal_id: int) -> None:
    before = requests_for(sandbox, portal_id)
    with pytest.raises(PortalUnavailable):
        await hubspot_client(services, portal_id).get_json(CONTACTS)
    assert requests_for(sandbox, portal_id) == before


@pytest.mark.parametrize("listed", [False, True], ids=["entry", "listed-in-entry"])
async def test_an_uninstall_in_hubspot_is_noticed_within_one_poll(
    install_portal: Any, services: Any, sandbox: Any, sandbox_app: Any, listed: bool
) -> None:
    # HubSpot does not document a downloaded entry's shape: both that are met are read.
    sandbox.config.journal_entries_listed = listed
    await install_portal(1001)
    await install_portal(1002)
    await uninstall_in_sandbox(sandbox_app, 1001)

    assert await poll_journal(services) >= 3  # two installs and the uninstall
    async with services.sessions() as session:
        signals = await session.execute(
            sa.select(col(InboxEvent.portal_id), col(InboxEvent.source)).where(
                col(InboxEvent.type) == UNINSTALL_EVENT
            )
        )
    # Read from the journal, before any refresh could meet the revoked token.
    assert signals.all() == [(1001, EventSource.journal)]
    # With the app token from the dated endpoint whose reference lists that grant (v1,
    # an older journal guide's, stops working in 2027).
    token_paths = {r.path for r in sandbox.request_log if r.path.endswith("/token")}
    assert "/oauth/2026-03/token" in token_paths
    await drain(services)

    assert await portal_state(services, 1001) == ("uninstalled", False)
    assert await portal_state(services, 1002) == ("active", True)
    await assert_no_more_calls(services, sandbox, 1001)


async def test_the_journal_poller_resumes_from_its_offset(
    install_portal: Any, services: Any, sandbox_app: Any
) -> None:
    await install_portal(1001)
    assert await poll_journal(services) == 1
    assert await poll_journal(services) == 0
    await uninstall_in_sandbox(sandbox_app, 1001)
    assert await poll_journal(services) == 1
    async with services.sessions() as session:
        offset = await session.get(AppState, "journal_offset")
    assert offset is not None
    assert offset.value


async def test_the_journal_is_not_read_while_no_portal_is_installed(
    install_portal: Any, services: Any, sandbox_app: Any
) -> None:
    assert await poll_journal(services) == 0
    assert services.hubspot.app_token is None, "no app token was asked for"
    await install_portal(1001)
    await uninstall_in_sandbox(sandbox_app, 1001)
    assert await poll_journal(services) == 2  # the install and the uninstall
    await drain(services)
    assert await portal_state(services, 1001) == ("uninstalled", False)
    services.hubspot.app_token = None
    assert await poll_journal(services) == 0
    assert services.hubspot.app_token is None


async def test_an_expired_journal_offset_is_asked_for_once(
    install_portal: Any, services: Any, sandbox: Any, caplog: pytest.LogCaptureFixture
) -> None:
    await install_portal(1001)
    assert await poll_journal(services) == 1
    sandbox.config.journal_retention_seconds = 0  # HubSpot no longer keeps that entry
    caplog.set_level(logging.WARNING, logger="app.lifecycle")
    for _ in range(3):
        assert await poll_journal(services) == 0
    expired = [r for r in caplog.records if "journal offset expired" in r.getMessage()]
    assert len(expired) == 1
    async with services.sessions() as session:
        forgotten = await session.get(AppState, "journal_offset")
    assert forgotten is not None
    assert forgotten.value == ""


async def work_for_a_revoked_portal(install_portal: Any, services: Any, sandbox: Any) -> int:
    """Portal 1001 installed, its access then revoked on HubSpot's side with no journal
    entry to read, and an event that needs its token; answers the event's id."""
    await install_portal(1001)
    fast_backoff(services)
    sandbox.revoke_portal_tokens(1001)
    return await enqueue_probe(services, 1001, "work-1")


async def test_a_refresh_answered_invalid_grant_uninstalls(
    install_portal: Any, services: Any, sandbox: Any
) -> None:
    event_id = await work_for_a_revoked_portal(install_portal, services, sandbox)

    await drain(services)

    assert await portal_state(services, 1001) == ("uninstalled", False)
    assert await event_status(services, event_id) == EventStatus.parked
    assert sandbox.refresh_count[1001] == 0  # HubSpot refused: no refresh succeeded
    async with services.sessions() as session:
        signals = (
            (
                await session.execute(
                    sa.select(InboxEvent).where(col(InboxEvent.type) == UNINSTALL_EVENT)
                )
            )
            .scalars()
            .all()
        )
    assert [s.source for s in signals] == [EventSource.lifecycle]
    await assert_no_more_calls(services, sandbox, 1001)


class ReinstalledWhileRecording(Worker):
    """A worker whose batch meets the uninstall (HubSpot rejects its refresh), after which
    the customer reinstalls before the worker has recorded the batch as parked."""

    def __init__(self, services: Any, reinstall: Callable[[], Awaitable[Any]]) -> None:
        super().__init__(services, poll_seconds=0.02)
        self.reinstall: Callable[[], Awaitable[Any]] | None = reinstall

    async def _record(self, batch: Any, outcomes: dict[int, Any]) -> bool:
        rejected = any(isinstance(outcome, RefreshRejected) for outcome in outcomes.values())
        if rejected and self.reinstall is not None:
            reinstall, self.reinstall = self.reinstall, None
            await reinstall()
        return await super()._record(batch, outcomes)


async def test_a_reinstall_while_a_batch_is_being_parked_leaves_nothing_parked(
    install_portal: Any, services: Any, sandbox: Any, caplog: pytest.LogCaptureFixture
) -> None:
    event_id = await work_for_a_revoked_portal(install_portal, services, sandbox)
    worker = ReinstalledWhileRecording(services, lambda: install_portal(1001))
    caplog.set_level(logging.WARNING, logger="app.worker")
    await worker.drain(timeout=20)
    # The log tells what was recorded for the batch that met the uninstall: a retry, not
    # the park it first decided on.
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("event ")]
    assert [message.split(":")[0].split()[-1] for message in logged] == ["retry"]
    assert worker.reinstall is None, "the batch met the uninstall and the reinstall ran"
    assert await portal_state(services, 1001) == ("active", True)
    # The install un-parked what was parked when it committed, which this batch was not
    # yet: the batch is retried (after its backoff, which the drain waits for).
    assert delivered == [(1001, event_id)]
    assert await event_status(services, event_id) == EventStatus.done


async def test_a_refresh_rejected_outside_the_worker_raises_and_uninstalls(
    install_portal: Any, services: Any, sandbox: Any
) -> None:
    await install_portal(1001)
    sandbox.revoke_portal_tokens(1001)
    with pytest.raises(RefreshRejected) as raised:
        await hubspot_client(services, 1001).get_json(CONTACTS)
    assert raised.value.portal_id == 1001
    assert raised.value.category == "invalid_grant"
    assert await portal_state(services, 1001) == ("uninstalled", False)


async def test_a_refresh_refused_for_another_apps_client_uninstalls_no_portal(
    install_portal: Any, settings: Any, sandbox: Any, sandbox_app: Any
) -> None:
    # A deploy with another app's credentials (staging's, say): HubSpot answers every
    # portal's refresh BAD_REFRESH_TOKEN, "not issued to this client". Read as uninstalls,
    # every portal's tokens would be deleted.
    await install_portal(1001)
    sandbox.config.client_id = "another-app"
    misconfigured = await open_services(
        settings.model_copy(update={"hubspot_client_id": "another-app"}),
        transport=httpx.ASGITransport(app=sandbox_app),
    )
    try:
        sandbox.expire_portal_tokens(1001)
        with pytest.raises(ClientRefused) as raised:
            await hubspot_client(misconfigured, 1001).get_json(CONTACTS)
        event_id = await enqueue_probe(misconfigured, 1001, "work-1")
        with pytest.raises(TimeoutError):  # the event waits to be retried
            await Worker(misconfigured, poll_seconds=0.02).drain(timeout=1)
        assert await portal_state(misconfigured, 1001) == ("active", True)
        async with misconfigured.sessions() as session:
            event = await session.get(InboxEvent, event_id)
            uninstalls = await session.scalar(
                sa.select(sa.func.count())
                .select_from(InboxEvent)
                .where(col(InboxEvent.type) == UNINSTALL_EVENT)
            )
        assert event is not None
        assert (event.status, uninstalls) == (EventStatus.pending, 0)
        assert "HUBSPOT_CLIENT_ID" in str(raised.value)
        assert "HUBSPOT_CLIENT_ID" in (event.last_error or "")
        # Nor does a disconnect go ahead on it: HubSpot was not asked to uninstall.
        with pytest.raises(HubSpotNotReached):
            await disconnect(misconfigured, 1001)
        assert await portal_state(misconfigured, 1001) == ("active", True)
    finally:
        await close_services(misconfigured)
    # Once the credentials are mended, the portal's tokens work as they did.
    sandbox.config.client_id = settings.hubspot_client_id
    fixed = await open_services(settings, transport=httpx.ASGITransport(app=sandbox_app))
    try:
        await hubspot_client(fixed, 1001).get_json(CONTACTS)
    finally:
        await close_services(fixed)


async def test_an_uninstall_clears_the_portal_problems(
    install_portal: Any, services: Any, sandbox_app: Any
) -> None:
    await install_portal(1001)
    await install_portal(1002)
    for portal_id in (1001, 1002):
        async with transaction(services.sessions) as session:
            await record_problem(portal_id, "marketing_events_scope", "no scope", session=session)
    await uninstall_in_sandbox(sandbox_app, 1001)
    await poll_journal(services)
    await drain(services)
    assert await portal_state(services, 1001) == ("uninstalled", False)
    async with services.sessions() as session:
        left = (await session.execute(sa.select(PortalProblem.portal_id))).scalars().all()
    assert left == [1002]


async def test_a_reinstall_resumes_the_parked_events(
    install_portal: Any, services: Any, sandbox_app: Any
) -> None:
    await install_portal(1001)
    await uninstall_in_sandbox(sandbox_app, 1001)
    await poll_journal(services)
    waiting = await enqueue_probe(services, 1001, "call-after-uninstall")
    await drain(services)
    assert await event_status(services, waiting) == EventStatus.parked
    assert delivered == []

    await install_portal(1001)
    assert await portal_state(services, 1001) == ("active", True)
    await drain(services)
    assert delivered == [(1001, waiting)]
    assert await event_status(services, waiting) == EventStatus.done


async def test_a_stale_uninstall_entry_after_a_reinstall_changes_nothing(
    install_portal: Any, services: Any, sandbox_app: Any
) -> None:
    await install_portal(1001)
    await uninstall_in_sandbox(sandbox_app, 1001)
    await install_portal(1001)  # reinstalled before Hubline read the journal

    await poll_journal(services)
    await drain(services)

    assert await portal_state(services, 1001) == ("active", True)
    assert await hubspot_client(services, 1001).get_json(CONTACTS) == {"results": []}
    async with services.sessions() as session:
        results = (
            (
                await session.execute(
                    sa.select(col(InboxEvent.result)).where(col(InboxEvent.type) == UNINSTALL_EVENT)
                )
            )
            .scalars()
            .all()
        )
    assert results
    assert all('"stale"' in (result or "") for result in results)


async def test_the_uninstall_handler_is_idempotent_and_ignores_older_generations(
    install_portal: Any, services: Any
) -> None:
    await install_portal(1001)
    await install_portal(1001)  # generation 2
    async with transaction(services.sessions) as session:
        stale = await apply_uninstall(1001, install_generation=1, occurred_at=None, session=session)
    assert stale == "stale"
    assert await portal_state(services, 1001) == ("active", True)
    outcomes = []
    for _ in range(2):
        async with transaction(services.sessions) as session:
            outcomes.append(
                await apply_uninstall(1001, install_generation=2, occurred_at=None, session=session)
            )
    assert outcomes == ["uninstalled", "already_uninstalled"]
    async with transaction(services.sessions) as session:
        assert (
            await apply_uninstall(4242, install_generation=None, occurred_at=None, session=session)
            == "unknown_portal"
        )


async def test_disconnect_uninstalls_on_hubspot_revokes_and_signals(
    install_portal: Any, services: Any, sandbox: Any
) -> None:
    await install_portal(1001)
    result = await disconnect(services, 1001)
    assert result.uninstalled_on_hubspot
    assert result.revoked
    assert sandbox.portal(1001).installed is False
    endpoints = {r.endpoint for r in sandbox.request_log}
    assert "DELETE /appinstalls/v3/external-install" in endpoints
    assert "POST /oauth/v3/token/revoke" in endpoints

    await drain(services)
    assert await portal_state(services, 1001) == ("uninstalled", False)
    await assert_no_more_calls(services, sandbox, 1001)
    # The journal's own record of the uninstall, read later, changes nothing more.
    await poll_journal(services)
    await drain(services)
    assert await portal_state(services, 1001) == ("uninstalled", False)


async def test_a_disconnect_hubspot_cannot_hear_changes_nothing_and_can_be_finished_later(
    install_portal: Any, services: Any, sandbox: Any
) -> None:
    await install_portal(1001)
    await install_portal(1002)
    fast_backoff(services)
    down = Fault(count=1000, status=503, path_prefix="/appinstalls/")
    sandbox.faults.append(down)
    with pytest.raises(HubSpotNotReached, match="portal 1001 is still connected; try again"):
        await disconnect(services, 1001)
    await drain(services)
    # Nothing changed: the tokens the uninstall needs are kept, and it can be asked again.
    assert await portal_state(services, 1001) == ("active", True)
    assert sandbox.portal(1001).installed is True
    sandbox.faults.remove(down)
    result = await disconnect(services, 1001)
    assert (result.uninstalled_on_hubspot, result.revoked) == (True, True)
    assert sandbox.portal(1001).installed is False
    await drain(services)
    assert await portal_state(services, 1001) == ("uninstalled", False)

    # Forced, the portal is disconnected here alone; HubSpot keeps the app installed.
    sandbox.faults.append(down)
    forced = await disconnect(services, 1002, force=True)
    assert not forced.uninstalled_on_hubspot
    await drain(services)
    assert await portal_state(services, 1002) == ("uninstalled", False)
    assert sandbox.portal(1002).installed is True

    # Disconnecting a portal already uninstalled asks HubSpot nothing, queues nothing, and
    # says so (it queued another uninstall event under a new key).
    calls = len(sandbox.request_log)
    async with services.sessions() as session:
        events_before = await session.scalar(sa.select(sa.func.count()).select_from(InboxEvent))
    again = await disconnect(services, 1001)
    assert (again.already_uninstalled, again.event_id) == (True, None)
    assert len(sandbox.request_log) == calls
    async with services.sessions() as session:
        events_after = await session.scalar(sa.select(sa.func.count()).select_from(InboxEvent))
    assert events_after == events_before


# --- scopes ----------------------------------------------------------------------------


@pytest.fixture
async def wider_app(make_settings: Any, settings: Any, sandbox_app: Any) -> AsyncIterator[Any]:
    """The next Hubline version: it requires one scope more than the installs granted."""
    wider = make_settings(hubspot_scopes=settings.hubspot_scopes + " crm.objects.companies.read")
    app = create_app(wider, transport=httpx.ASGITransport(app=sandbox_app))
    async with LifespanManager(app):
        yield app


async def test_a_portal_missing_a_required_scope_needs_reauth_until_it_consents(
    install_portal: Any, wider_app: Any, sandbox_app: Any
) -> None:
    await install_portal(1001)
    newer = wider_app.state.services
    waiting = await enqueue_probe(newer, 1001, "needs-companies")

    await drain(newer)

    assert await portal_state(newer, 1001) == ("needs_reauth", True)
    assert await event_status(newer, waiting) == EventStatus.parked  # parked, not failed
    async with newer.sessions() as session:
        problems = await list_problems(1001, session=session)
    assert [p.code for p in problems] == ["needs_reauth"]
    assert "crm.objects.companies.read" in problems[0].message
    assert f"{HUBLINE_URL}/oauth/install" in problems[0].message

    # The admin consents again through the (new) install link: the work resumes.
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=wider_app), base_url=HUBLINE_URL
    ) as browser:
        started = await browser.get("/oauth/install")
        page = await browser.get(
            await approve_in_sandbox(sandbox_app, started.headers["location"], 1001)
        )
    assert settings_page_value(page.text, "portal-status") == "active"
    await drain(newer)
    assert delivered == [(1001, waiting)]


async def test_the_scope_check_marks_portals_missing_a_scope(
    install_portal: Any, wider_app: Any
) -> None:
    await install_portal(1001)
    await install_portal(1002)
    assert await check_scopes(wider_app.state.services) == 2
    assert await portal_state(wider_app.state.services, 1002) == ("needs_reauth", True)


# --- keys -------------------------------------------------------------------------------


async def test_start_up_refuses_keys_that_cannot_read_the_stored_tokens(
    install_portal: Any, make_settings: Any
) -> None:
    await install_portal(1001)
    with pytest.raises(UnknownKeyError) as raised:
        resources = await open_services(make_settings(token_encryption_keys=generate_key()))
        await close_services(resources)
    assert "TOKEN_ENCRYPTION_KEYS" in str(raised.value)
    assert "\n" not in str(raised.value)


# --- nothing secret in the logs ------------------------------------------------------------


async def test_the_logs_of_install_refresh_and_uninstall_hold_no_secret(
    caplog: pytest.LogCaptureFixture,
    client: httpx.AsyncClient,
    install_portal: Any,
    services: Any,
    sandbox: Any,
    sandbox_app: Any,
) -> None:
    caplog.set_level(logging.DEBUG)
    fast_backoff(services)
    installed = [await install_portal(1001), await install_portal(1002), await install_portal(1003)]
    await install_portal(1001)  # a reinstall
    api = hubspot_client(services, 1001)
    # A refresh ahead of expiry, a refresh after a 401, a refresh that fails and is retried.
    async with transaction(services.sessions) as session:
        await session.execute(
            sa.update(OAuthToken).values(expires_at=utcnow() - timedelta(seconds=1))
        )
    await api.get_json(CONTACTS)
    sandbox.expire_portal_tokens(1001)
    await api.get_json(CONTACTS)
    # Uninstall through the journal, through invalid_grant, and through a disconnect.
    await uninstall_in_sandbox(sandbox_app, 1001)
    await poll_journal(services)
    sandbox.revoke_portal_tokens(1002)
    await enqueue_probe(services, 1002, "after-revoke")
    await disconnect(services, 1003)
    await drain(services)
    assert [await portal_state(services, p) for p in (1001, 1002, 1003)] == [
        ("uninstalled", False)
    ] * 3
    # Failed callbacks, whose queries hold a code and a state.
    assert (
        await client.get("/oauth/callback?code=leaked-code&state=leaked-state")
    ).status_code == 400
    assert (await client.get("/oauth/callback?code=leaked-code")).status_code == 400

    secrets = [
        *sandbox.issued_secrets(),
        *sandbox.journal_urls,
        *(p.webhook_secret for p in installed),
        "leaked-code",
        "leaked-state",
    ]
    formatter = logging.Formatter("%(name)s %(message)s %(exc_info)s")
    checked = 0
    for record in caplog.records:
        # The sandbox is HubSpot, not Hubline. httpx logs every URL at INFO, which is why
        # configure_logging keeps it at WARNING: the test browser's callback URLs hold codes.
        if record.name.startswith(("app.sandbox", "httpx", "httpcore")):
            continue
        line = formatter.format(record) + repr(record.__dict__)
        checked += 1
        assert "Authorization" not in line, line
        assert "Bearer " not in line, line
        for secret in secrets:
            assert secret not in line, f"a secret in a log line of {record.name}"
    assert checked > 5


async def test_after_a_reinstall_a_number_that_changed_hands_meanwhile_finds_its_new_holder(
    install_portal: Any, services: Any, sandbox: Any, sandbox_app: Any, client: Any
) -> None:
    # While the app was uninstalled HubSpot told it nothing: Ada's number moved to Grace.
    # The caller index still named Ada, and the first call after the reinstall went on
    # her contact (her AI properties overwritten with Grace's call). An index entry is
    # now a hint the contact must confirm.
    ada_phone = {"name": "Ada Lovelace", "phone": "+1 415 555 0100"}
    portal = await install_portal(1001)
    await post_event(client, portal, call(caller=ada_phone))
    await drain(services)
    [ada] = sandbox.contacts(1001)
    await uninstall_in_sandbox(sandbox_app, 1001)
    await poll_journal(services)
    await drain(services)
    assert (await portal_state(services, 1001))[0] == PortalStatus.uninstalled
    world = sandbox.portal(1001)
    update_object(sandbox, world, ada, {"phone": "+1 415 555 0199"}, UI_SOURCE)
    grace = person_contact(sandbox, 1001, firstname="Grace", phone="+14155550100")

    portal = await install_portal(1001)
    await post_event(client, portal, call(caller=ada_phone | {"name": "Grace Hopper"}))
    await drain(services)
    last_call = sandbox.calls(1001)[-1]
    assert world.associated("calls", last_call.id, "contacts") == [grace.id]
    assert len(sandbox.contacts(1001)) == 2


async def erase_in_hubspot(sandbox: Any, client: Any, contact: Any) -> httpx.Response:
    """A privacy deletion of portal 1001's `contact`, and HubSpot's webhook delivering it."""
    before = len(sandbox.webhook_events)
    privacy_delete_contact(sandbox, sandbox.portal(1001), contact, UI_SOURCE)
    sent = list(sandbox.webhook_events)[before:]
    assert PRIVACY_DELETION in [event["subscriptionType"] for event in sent]
    return await post_hubspot(client, TEST_CLIENT_SECRET, sent)


async def caller_details_kept(services: Any, phone: str) -> tuple[str | None, int]:
    """Where the index still points `phone`, and how many receptionist payloads are kept."""
    async with services.sessions() as session:
        indexed = await identity.lookup(
            1001, identity.PHONE, phone, session=session, cipher=services.cipher
        )
        payloads = await session.scalar(
            sa.select(sa.func.count()).where(
                col(InboxEvent.source) == EventSource.receptionist,
                col(InboxEvent.payload_ct).is_not(None),
            )
        )
    return indexed, int(payloads or 0)


async def test_a_privacy_deletion_sent_while_uninstalled_here_still_erases_the_caller(
    install_portal: Any, services: Any, sandbox: Any, client: Any
) -> None:
    # HubSpot revoked the grant without uninstalling the app (or a disconnect was forced
    # here): Hubline counts the portal uninstalled and parks the caller's next call, while
    # HubSpot still sends the app the caller's privacy deletion. It was ignored, and the
    # parked call made the erased person again on the reinstall.
    ada = {"name": "Ada Lovelace", "phone": "+1 415 555 0100", "email": "ada@example.com"}
    portal = await install_portal(1001)
    await post_event(client, portal, call(caller=ada))
    await drain(services)
    [contact] = sandbox.contacts(1001)
    sandbox.revoke_portal_tokens(1001)
    sandbox.expire_portal_tokens(1001)
    await post_event(client, portal, call(caller=ada))
    await drain(services)
    assert await portal_state(services, 1001) == (PortalStatus.uninstalled, False)

    answer = await erase_in_hubspot(sandbox, client, contact)
    assert answer.json()["stored"] == 1  # the erasure; the contact's deletion is ignored
    await drain(services)
    assert await caller_details_kept(services, "+14155550100") == (None, 0)
    await install_portal(1001)
    await drain(services)
    assert sandbox.contacts(1001) == []


async def test_a_privacy_deletion_for_a_portal_awaiting_re_consent_erases_at_once(
    install_portal: Any, wider_app: Any, sandbox: Any, client: Any, services: Any
) -> None:
    # Parked with the portal's other events, the erasure waited for a re-consent that
    # may never come, and was then deleted with them, unapplied.
    portal = await install_portal(1001)
    await post_event(client, portal, call(caller={"name": "Ada", "phone": "+1 415 555 0100"}))
    await drain(services)
    [contact] = sandbox.contacts(1001)
    newer = wider_app.state.services  # the next version requires one scope more
    assert await check_scopes(newer) == 1
    assert (await portal_state(newer, 1001))[0] == PortalStatus.needs_reauth
    answer = await erase_in_hubspot(sandbox, client, contact)
    assert answer.json()["stored"] == 2  # the deletion, parked; the erasure, not
    await drain(newer)
    assert await caller_details_kept(newer, "+14155550100") == (None, 0)


async def test_a_journal_uninstall_is_applied_to_a_portal_awaiting_re_consent(
    install_portal: Any, wider_app: Any, sandbox_app: Any
) -> None:
    # The portal's first batch after the upgrade finds it needs re-consent and parks its
    # events: the journal's uninstall signal among them, never applied (tokens kept, the
    # portal shown as waiting for a re-consent that had become an uninstall).
    await install_portal(1001)
    newer = wider_app.state.services  # the next version requires one scope more
    await enqueue_probe(newer, 1001, "backlog")
    await uninstall_in_sandbox(sandbox_app, 1001)
    assert await poll_journal(newer) >= 1
    await drain(newer)
    assert await portal_state(newer, 1001) == (PortalStatus.uninstalled, False)


async def test_a_disconnect_is_applied_at_once_and_no_call_for_the_portal_follows(
    install_portal: Any, services: Any, sandbox: Any, client: Any
) -> None:
    # The uninstall signal was applied when the worker reached it, behind the portal's
    # earlier events: meanwhile the tokens were kept and the worker synced those events
    # with the revoked token (a 401, then a refused refresh).
    portal = await install_portal(1001)
    await drain(services)
    await post_event(client, portal, call())  # not synced yet when the operator disconnects
    outcome = await disconnect(services, 1001)
    assert (outcome.uninstalled_on_hubspot, outcome.revoked) == (True, True)
    assert await portal_state(services, 1001) == (PortalStatus.uninstalled, False)
    logged = len(sandbox.request_log)
    await drain(services)
    assert [r.endpoint for r in list(sandbox.request_log)[logged:]] == []
    async with services.sessions() as session:
        waiting = await session.scalar(
            sa.select(col(InboxEvent.status)).where(
                col(InboxEvent.source) == EventSource.receptionist
            )
        )
    assert waiting == EventStatus.parked  # for a reinstall


async def test_an_uninstalled_portals_caller_index_goes_with_its_parked_events(
    install_portal: Any, services: Any, sandbox_app: Any, client: Any
) -> None:
    # Kept for good before: keyed hashes of every caller's phone and email, mapped to
    # contacts, of a portal gone for years. It goes once the portal has been uninstalled
    # for the parked retention and no event of its holds a caller any longer (a privacy
    # deletion finds a parked or failed call's caller through it).
    portals = [await install_portal(portal_id) for portal_id in (1001, 1002)]
    for portal in portals:
        await post_event(client, portal, call(caller={"name": "Ada", "phone": "+1 415 555 0100"}))
    await drain(services)
    await uninstall_in_sandbox(sandbox_app, 1001)
    await poll_journal(services)
    await drain(services)
    await post_event(client, portals[0], call())
    await drain(services)  # parked: the portal is uninstalled
    long_ago = utcnow() - timedelta(days=services.settings.parked_retention_days, hours=1)
    async with transaction(services.sessions) as session:
        await session.execute(
            sa.update(Portal).where(col(Portal.portal_id) == 1001).values(uninstalled_at=long_ago)
        )
    await _retention(services)
    assert await caller_index_size(services) == {1001: 1, 1002: 1}
    async with transaction(services.sessions) as session:
        await session.execute(sa.update(InboxEvent).values(received_at=long_ago))
        await session.execute(
            sa.update(InboxEvent)
            .where(col(InboxEvent.finished_at).is_not(None))
            .values(finished_at=long_ago)
        )
    # The parked call goes, the handled ones' payloads too, and the index with them.
    await _retention(services)
    assert await caller_index_size(services) == {1002: 1}


async def caller_index_size(services: Any) -> dict[int, int]:
    async with services.sessions() as session:
        rows = await session.execute(
            sa.select(col(IdentityEntry.portal_id), sa.func.count()).group_by(
                col(IdentityEntry.portal_id)
            )
        )
    return dict(rows.all())


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_an_uninstall_meeting_a_token_refresh_waits_its_turn_instead_of_deadlocking(
    install_portal: Any, services: Any
) -> None:
    # A refresh holds the token row while HubSpot answers and, refused, takes the portal
    # row to record the uninstall; a disconnect's uninstall took the portal row first and
    # then the token row: PostgreSQL ended one of them as a deadlock.
    await install_portal(1001)
    engine = db.create_engine(services.settings.database_url, poolclass=sa.NullPool)
    try:
        async with engine.connect() as refresh:
            await refresh.begin()
            await refresh.execute(
                sa.select(OAuthToken.portal_id)
                .where(OAuthToken.portal_id == 1001)
                .with_for_update()
            )

            async def uninstall() -> str:
                async with transaction(services.sessions) as session:
                    return await apply_uninstall(
                        1001, install_generation=None, occurred_at=None, session=session
                    )

            uninstalling = asyncio.create_task(uninstall())
            waiting = await until_waiting_on_locks(engine, 1)
            assert waiting == 1, "the uninstall waits on a lock the refresh holds"
            await refresh.execute(
                sa.select(Portal.portal_id).where(Portal.portal_id == 1001).with_for_update()
            )
            await refresh.commit()
        assert await asyncio.wait_for(uninstalling, timeout=10) == "uninstalled"
    finally:
        await engine.dispose()
