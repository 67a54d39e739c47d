"""The customer's settings page: what it shows, and its actions behind the portal session."""

from __future__ import annotations

import re
from typing import Any

import httpx
import sqlalchemy as sa
from sqlmodel import col

from app.db import transaction
from app.inbox import read_payload
from app.lifecycle import apply_uninstall, mark_needs_reauth
from app.models import EventStatus, InboxEvent, Portal, ReceptionistSecret, utcnow
from app.portals import record_problem
from app.settings_page import describe_duration
from tests.conftest import HUBLINE_URL, settings_page_value
from tests.sync_support import call, drain
from tests.webhook_support import call_event, receptionist_path


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, "the page has no CSRF token"
    return match.group(1)


async def post_as_receptionist(
    client: httpx.AsyncClient, portal_id: int, secret: str, event: dict[str, Any]
) -> httpx.Response:
    return await client.post(
        receptionist_path(portal_id), json=event, headers={"Authorization": f"Bearer {secret}"}
    )


async def test_the_settings_page_comes_back_with_the_session_the_install_opened(
    client: httpx.AsyncClient, install_portal: Any
) -> None:
    portal = await install_portal(1001)
    page = await client.get("/settings")
    assert page.status_code == 200
    assert page.headers["cache-control"] == "no-store"
    assert settings_page_value(page.text, "webhook-url") == portal.webhook_url
    assert settings_page_value(page.text, "webhook-secret") == portal.webhook_secret
    assert settings_page_value(page.text, "portal-status") == "active"
    assert settings_page_value(page.text, "no-problems").startswith("No problems")
    assert settings_page_value(page.text, "current-region") == "US"
    # What uninstalling does to their data, in plain words.
    assert "Contacts, calls, notes" in page.text
    assert "30 days" in page.text


async def test_no_page_may_be_framed_or_sniffed(
    client: httpx.AsyncClient, install_portal: Any
) -> None:
    # Framed by another page of the same site (another port of it), which SameSite lets
    # the cookies through to, the settings page's buttons could be clicked through a decoy.
    await install_portal(1001)
    for path in ("/", "/settings", "/admin", "/healthz", "/oauth/callback"):
        answer = await client.get(path)
        assert answer.headers["X-Frame-Options"] == "DENY", path
        assert answer.headers["Content-Security-Policy"] == "frame-ancestors 'none'", path
        assert answer.headers["X-Content-Type-Options"] == "nosniff", path


async def test_without_the_session_every_settings_route_says_to_install_again(
    hubline_app: Any, client: httpx.AsyncClient, install_portal: Any, services: Any
) -> None:
    portal = await install_portal(1001)
    csrf = csrf_of((await client.get("/settings")).text)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=hubline_app), base_url=HUBLINE_URL
    ) as stranger:
        for method, path in [
            ("GET", "/settings"),
            ("POST", "/settings/rotate-secret"),
            ("POST", "/settings/test-event"),
            ("POST", "/settings/phone-region"),
        ]:
            answer = await stranger.request(method, path, data={"csrf": csrf, "region": "GB"})
            assert answer.status_code == 401, path
            assert settings_page_value(answer.text, "error-reason") == "no_session"
            assert "install Hubline again from HubSpot" in answer.text
            # At PUBLIC_URL: from a page opened by another name of the server, a relative
            # link started an install whose cookie the callback (at PUBLIC_URL) never saw.
            assert 'href="http://hubline.test/oauth/install"' in answer.text
            assert portal.webhook_secret not in answer.text
        # A forged or altered cookie is no session either.
        value = client.cookies["hubline_portal"]
        pid, generation, expires, mac = value.split(".")
        stranger.cookies.set("hubline_portal", f"{pid}.{generation}.{int(expires) + 9999}.{mac}")
        answer = await stranger.post("/settings/rotate-secret", data={"csrf": csrf})
        assert answer.status_code == 401
    async with services.sessions() as session:
        count = await session.scalar(sa.select(sa.func.count()).select_from(ReceptionistSecret))
    assert count == 1, "nothing was rotated"


async def test_a_form_of_a_portal_whose_session_another_tab_took_over_changes_nothing(
    client: httpx.AsyncClient, install_portal: Any, services: Any
) -> None:
    first = await install_portal(1001)
    first_page = (await client.get("/settings")).text
    await install_portal(1003)  # in another tab of the same browser: the session is 1003's
    answer = await client.post(
        "/settings/rotate-secret",
        data={"csrf": csrf_of(first_page), "portal_id": "1001"},
    )
    assert answer.status_code == 409
    assert settings_page_value(answer.text, "error-reason") == "other_portal"
    assert "session is now portal 1003" in answer.text
    assert first.webhook_secret not in answer.text
    async with services.sessions() as session:
        count = await session.scalar(sa.select(sa.func.count()).select_from(ReceptionistSecret))
    assert count == 2, "nothing was rotated"


async def test_settings_forms_without_the_csrf_token_are_refused(
    client: httpx.AsyncClient, install_portal: Any, services: Any
) -> None:
    portal = await install_portal(1001)
    for data in ({}, {"csrf": "forged"}):
        answer = await client.post("/settings/rotate-secret", data=data)
        assert answer.status_code == 403
        assert settings_page_value(answer.text, "error-reason") == "csrf"
        assert "reload the settings page" in answer.text
    page = await client.get("/settings")
    assert settings_page_value(page.text, "webhook-secret") == portal.webhook_secret


async def test_a_session_ends_with_its_install(
    hubline_app: Any, client: httpx.AsyncClient, install_portal: Any, services: Any
) -> None:
    first = await install_portal(1001)
    first_session, first_csrf = client.cookies["hubline_portal"], csrf_of(first.page)
    await install_portal(1001)  # a reinstall: a new generation, a new session
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=hubline_app),
        base_url=HUBLINE_URL,
        cookies={"hubline_portal": first_session},
    ) as old_tab:
        answer = await old_tab.post("/settings/rotate-secret", data={"csrf": first_csrf})
    assert answer.status_code == 403
    assert settings_page_value(answer.text, "error-reason") == "stale_session"
    async with transaction(services.sessions) as session:
        await apply_uninstall(1001, install_generation=None, occurred_at=None, session=session)
    assert (await client.get("/settings")).status_code == 403


async def test_rotating_the_secret_shows_the_new_one_and_the_old_one_expires(
    client: httpx.AsyncClient, install_portal: Any, services: Any
) -> None:
    portal = await install_portal(1001)
    page = await client.get("/settings")
    rotated = await client.post(
        "/settings/rotate-secret", data={"csrf": csrf_of(page.text)}, follow_redirects=True
    )
    assert rotated.status_code == 200
    new_secret = settings_page_value(rotated.text, "webhook-secret")
    assert new_secret.startswith("whsec_")
    assert new_secret != portal.webhook_secret
    assert "the old one keeps working for 24 hours" in settings_page_value(rotated.text, "notice")
    # The answer was a redirect to a GET: reloading the page shows, never rotates again.
    assert [r.status_code for r in rotated.history] == [303]
    reloaded = await client.get(str(rotated.url))
    assert settings_page_value(reloaded.text, "webhook-secret") == new_secret
    old_event, new_event = call_event(id="evt-old"), call_event(id="evt-new")
    assert (
        await post_as_receptionist(client, 1001, portal.webhook_secret, old_event)
    ).status_code == 202
    assert (await post_as_receptionist(client, 1001, new_secret, new_event)).status_code == 202
    # The grace period ends.
    async with transaction(services.sessions) as session:
        await session.execute(
            sa.update(ReceptionistSecret)
            .where(col(ReceptionistSecret.expires_at).is_not(None))
            .values(expires_at=utcnow())
        )
    # Rewriting expires_at stands in for the grace period passing; the intake cache bounds
    # each entry by the expiries it read, so it is told here, as time would have told it.
    services.portals.forget(1001)
    refused = await post_as_receptionist(
        client, 1001, portal.webhook_secret, call_event(id="evt-late")
    )
    assert refused.status_code == 401
    accepted = await post_as_receptionist(client, 1001, new_secret, call_event(id="evt-later"))
    assert accepted.status_code == 202
    assert settings_page_value((await client.get("/settings")).text, "webhook-secret") == (
        new_secret
    )


async def test_a_test_event_arrives_through_the_real_route_and_never_reaches_the_crm(
    client: httpx.AsyncClient, install_portal: Any, services: Any, sandbox: Any
) -> None:
    await install_portal(1001)
    page = await client.get("/settings")
    answer = await client.post("/settings/test-event", data={"csrf": csrf_of(page.text)})
    assert answer.status_code == 200
    result = settings_page_value(answer.text, "test-event-result")
    assert result.startswith("The test event arrived")
    assert "Nothing was written to your CRM" in result
    async with services.sessions() as session:
        [ping] = (
            await session.execute(sa.select(InboxEvent).where(col(InboxEvent.type) == "test.ping"))
        ).scalars()
    assert ping.source == "receptionist"
    assert f"(event {ping.id})" in result
    metrics = (await client.get("/metrics")).text
    assert 'hubline_webhook_events_total{outcome="accepted",reason="",source="receptionist"}' in (
        metrics
    )
    await drain(services)
    async with services.sessions() as session:
        handled = await session.get(InboxEvent, ping.id, populate_existing=True)
    assert handled is not None
    assert handled.status == EventStatus.done
    assert sandbox.contacts(1001) == []
    assert sandbox.calls(1001) == []
    # The owner asks whether the receptionist itself is connected: a test says nothing of it.
    last = settings_page_value((await client.get("/settings")).text, "last-event")
    assert last == "none yet"
    portal = await client.get("/settings")
    secret = settings_page_value(portal.text, "webhook-secret")
    assert (await post_as_receptionist(client, 1001, secret, call_event())).status_code == 202
    waiting = settings_page_value((await client.get("/settings")).text, "last-event")
    assert waiting != "none yet"
    # Taken up by the worker, it is read from the portal, not from the events.
    await drain(services)
    assert settings_page_value((await client.get("/settings")).text, "last-event") == waiting


async def test_the_default_phone_region_is_shown_changed_and_used(
    client: httpx.AsyncClient, install_portal: Any, services: Any
) -> None:
    portal = await install_portal(1001)
    csrf = csrf_of((await client.get("/settings")).text)
    # "ß" was taken: its upper case is "SS" (South Sudan).
    for unknown in ("XX", "ß"):
        refused = await client.post(
            "/settings/phone-region", data={"csrf": csrf, "region": unknown}
        )
        assert refused.status_code == 400
        assert "is not a region Hubline knows" in settings_page_value(
            refused.text, "settings-error"
        )
    changed = await client.post(
        "/settings/phone-region", data={"csrf": csrf, "region": "gb"}, follow_redirects=True
    )
    assert changed.status_code == 200
    assert "now read as GB numbers" in settings_page_value(changed.text, "notice")
    assert settings_page_value(changed.text, "current-region") == "GB"
    assert '<option value="GB" selected>' in changed.text
    event = call(id="evt-uk", caller={"name": "Hedy", "phone": "020 7946 0958"})
    assert (await post_as_receptionist(client, 1001, portal.webhook_secret, event)).status_code == (
        202
    )
    async with services.sessions() as session:
        [stored] = (
            await session.execute(
                sa.select(InboxEvent).where(col(InboxEvent.type) == "call.completed")
            )
        ).scalars()
    payload = read_payload(stored, services.cipher)
    assert payload["caller"]["phone_e164"] == "+442079460958"
    cleared = await client.post(
        "/settings/phone-region", data={"csrf": csrf, "region": ""}, follow_redirects=True
    )
    assert settings_page_value(cleared.text, "current-region") == "US"
    async with services.sessions() as session:
        row = await session.get(Portal, 1001, populate_existing=True)
    assert row is not None
    assert row.default_phone_region is None


async def test_a_portal_that_needs_reauthorization_says_so_with_the_re_consent_button(
    client: httpx.AsyncClient, install_portal: Any, services: Any
) -> None:
    await install_portal(1001)
    async with transaction(services.sessions) as session:
        await mark_needs_reauth(
            1001, ["crm.objects.companies.read"], session=session, settings=services.settings
        )
    page = await client.get("/settings")
    assert settings_page_value(page.text, "portal-status") == "needs_reauth"
    assert "syncing is paused" in page.text
    assert f'href="{HUBLINE_URL}/oauth/install" data-testid="reauth"' in page.text


async def test_sync_problems_are_shown_in_plain_words(
    client: httpx.AsyncClient, install_portal: Any, services: Any
) -> None:
    portal = await install_portal(1001)
    async with transaction(services.sessions) as session:
        await record_problem(
            1001,
            "property:call_outcome",
            "The portal already has a contact property named 'call_outcome' of type number.",
            session=session,
        )
        await record_problem(
            1001,
            "properties:schema_scope",
            "Hubline cannot create its contact properties: the portal did not grant a scope.",
            session=session,
        )
    event = call(id="evt-bad")
    await post_as_receptionist(client, 1001, portal.webhook_secret, event)
    async with transaction(services.sessions) as session:
        await session.execute(
            sa.update(InboxEvent)
            .where(col(InboxEvent.type) == "call.completed")
            .values(
                status=EventStatus.failed,
                last_error="HubSpot rejected the record: email is not a valid email address",
                finished_at=utcnow(),  # as the worker records a failure
            )
        )
    page = await client.get("/settings")
    problems = re.findall(r'data-testid="problem"><strong>([^<]+)</strong>\s*([^<]+)<', page.text)
    kinds = {kind for kind, _ in problems}
    assert kinds == {"Property clash:", "Missing permission:", "HubSpot rejection:"}
    rejection = next(text for kind, text in problems if kind == "HubSpot rejection:")
    assert "email is not a valid email address" in rejection

    # A HubSpot error as stored: the request, the portal and HubSpot's correlation id are
    # the operator's; the owner reads what HubSpot said and its status.
    async with transaction(services.sessions) as session:
        await session.execute(
            sa.update(InboxEvent)
            .where(col(InboxEvent.type) == "call.completed")
            .values(
                last_error="POST /crm/v3/objects/contacts/search: HubSpot refused the request "
                "status=400 category=VALIDATION_ERROR portal=1001 correlationId=f00-ba4"
            )
        )
    page = await client.get("/settings")
    problems = re.findall(r'data-testid="problem"><strong>([^<]+)</strong>\s*([^<]+)<', page.text)
    [refused] = [text for kind, text in problems if kind == "HubSpot rejection:"]
    assert refused.rstrip().endswith(
        "was not synced: HubSpot refused the request (status 400, VALIDATION_ERROR)"
    )


async def test_error_pages_say_what_happened_and_what_to_do(client: httpx.AsyncClient) -> None:
    page = await client.get("/no-such-page")
    assert page.status_code == 404
    assert settings_page_value(page.text, "error-action") == "Go to the start page"
    assert "There is no page here" in page.text
    wrong_method = await client.get("/settings/rotate-secret")
    assert wrong_method.status_code == 405
    assert settings_page_value(wrong_method.text, "error-action") == "Go to the start page"
    machine = await client.get("/webhooks/nothing-here")
    assert machine.status_code == 404
    assert machine.json() == {"error": "not_found", "detail": None}
    expired = await client.get("/oauth/callback?state=gone&code=x")
    assert expired.status_code == 400
    assert settings_page_value(expired.text, "error-action") == "Start the install again"


async def test_the_landing_page_says_what_installing_does_and_asks(
    client: httpx.AsyncClient,
) -> None:
    page = await client.get("/")
    said = settings_page_value(page.text, "what-it-does")
    assert said.count(". ") + said.endswith(".") == 2, "two sentences"
    for scope in ("crm.objects.contacts.read", "crm.schemas.contacts.read", "marketing_events"):
        assert scope in page.text
    assert settings_page_value(page.text, "manage") == "Manage my installation"


def test_grace_periods_read_naturally() -> None:
    assert describe_duration(24) == "24 hours"
    assert describe_duration(1) == "1 hour"
    assert describe_duration(0.5) == "30 minutes"
    assert describe_duration(0.0005) == "2 seconds"
    assert describe_duration(0) == "0 seconds"
