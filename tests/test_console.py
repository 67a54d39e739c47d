"""The operator console: sign-in, sessions, CSRF, the portals table and the portal page."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from asgi_lifespan import LifespanManager
from sqlmodel import col

from app.console import SIGNED_OUT, FailedSignIns
from app.db import transaction
from app.inbox import NewEvent, enqueue
from app.main import Services, create_app
from app.models import (
    AppState,
    EventSource,
    EventStatus,
    InboxEvent,
    Portal,
    PortalStatus,
    utcnow,
)
from app.portals import accepted_secrets, create_secret
from app.settings import Settings

ADMIN_TOKEN = "operator-token-for-tests"


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Services]]:
    """Hubline with these settings, and a client that reaches it as plain http."""
    app = create_app(settings)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://hubline.test"
        ) as http,
    ):
        yield http, app.state.services


@pytest.fixture
async def console(
    make_settings: Callable[..., Settings],
) -> AsyncIterator[tuple[httpx.AsyncClient, Services]]:
    async with serving(make_settings(admin_token=ADMIN_TOKEN)) as console:
        yield console


async def seed(resources: Services) -> dict[str, Any]:
    async with transaction(resources.sessions) as session:
        session.add(
            Portal(
                portal_id=1001,
                hub_domain="acme-dental.example",
                scopes="oauth crm.objects.contacts.read",
            )
        )
        session.add(
            Portal(portal_id=1002, hub_domain="bright.example", status=PortalStatus.needs_reauth)
        )
        await session.flush()
        await create_secret(1001, session=session, cipher=resources.cipher)
        failed = await enqueue(
            NewEvent(
                1001,
                EventSource.receptionist,
                "call.completed",
                "evt-failed",
                utcnow(),
                {"summary": "x"},
            ),
            session=session,
            cipher=resources.cipher,
        )
        await session.execute(
            sa.update(InboxEvent)
            .where(col(InboxEvent.id) == failed.event_id)
            .values(status=EventStatus.failed, last_error="HubSpot rejected the email", attempts=3)
        )
    return {"failed_event": failed.event_id}


async def sign_in(http: httpx.AsyncClient, token: str = ADMIN_TOKEN) -> httpx.Response:
    return await http.post("/admin/login", data={"token": token})


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, "the page has no CSRF token"
    return match.group(1)


async def test_console_does_not_exist_without_an_admin_token(client: httpx.AsyncClient) -> None:
    for path in ("/admin", "/admin/portals/1001"):
        assert (await client.get(path)).status_code == 404
    assert (await client.post("/admin/login", data={"token": "x"})).status_code == 404


async def test_signed_out_is_a_401_that_reveals_nothing(
    console: tuple[httpx.AsyncClient, Services],
) -> None:
    http, resources = console
    await seed(resources)
    response = await http.get("/admin")
    assert response.status_code == 401
    assert "acme-dental" not in response.text
    assert "1001" not in response.text
    assert (await http.get("/admin/portals/1001")).status_code == 401


async def test_a_script_reads_the_pages_with_the_bearer_token_but_cannot_post_forms(
    console: tuple[httpx.AsyncClient, Services],
) -> None:
    http, resources = console
    await seed(resources)
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    page = await http.get("/admin", headers=headers)
    assert page.status_code == 200
    assert "acme-dental" in page.text
    assert (await http.get("/admin/portals/1001", headers=headers)).status_code == 200
    wrong = await http.get("/admin", headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 401
    assert "acme-dental" not in wrong.text
    # A form needs the signed-in cookie and its CSRF token, which no script is given.
    posted = await http.post("/admin/logout", headers=headers, data={"csrf": ""})
    assert posted.status_code == 401


class RecordedWaits:
    """The throttle's sleeps, recorded instead of slept; `gate` holds them until opened."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await self.gate.wait()


def recorded_waits(http: httpx.AsyncClient) -> RecordedWaits:
    waits = RecordedWaits()
    app = http._transport.app  # type: ignore[attr-defined]
    app.state.failed_sign_ins = FailedSignIns(sleep=waits)
    return waits


async def test_wrong_tokens_are_refused_ever_more_slowly_on_the_form_and_the_api(
    console: tuple[httpx.AsyncClient, Services],
) -> None:
    http, _ = console
    waits = recorded_waits(http)
    for _ in range(3):
        response = await sign_in(http, "guess")
        assert response.status_code == 401
        assert "hubline_admin" not in response.headers.get("set-cookie", "")
    # The API takes the same token: its wrong guesses count and wait alike.
    api = await http.get("/admin/api/portals", headers={"Authorization": "Bearer guess"})
    assert api.status_code == 401
    assert (await sign_in(http, "guess")).status_code == 401
    assert waits.waits == [0.0, 0.25, 0.5, 1.0, 2.0]
    # The right token still gets in (after its wait), and clears the count.
    assert (await sign_in(http)).status_code == 303
    assert (await sign_in(http, "guess")).status_code == 401
    assert waits.waits[-2:] == [4.0, 0.0]


async def test_guesses_sent_at_once_are_checked_one_at_a_time_and_a_few_at_most(
    console: tuple[httpx.AsyncClient, Services],
) -> None:
    http, _ = console
    waits = recorded_waits(http)
    assert (await sign_in(http, "guess")).status_code == 401
    waits.gate.clear()  # every check now waits until the gate opens
    guesses = [
        asyncio.create_task(
            http.get("/admin/api/portals", headers={"Authorization": f"Bearer guess-{n}"})
        )
        for n in range(20)
    ]
    async with asyncio.timeout(5):
        while len(waits.waits) < 2:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert len(waits.waits) == 2, "one guess at a time: the others wait their turn"
    waits.gate.set()
    answers = [response.status_code for response in await asyncio.gather(*guesses)]
    assert answers.count(401) == FailedSignIns.MAX_WAITING
    assert answers.count(429) == 20 - FailedSignIns.MAX_WAITING
    # Each checked guess waited longer than the one before it.
    assert waits.waits == [0.0, 0.25, 0.5, 1.0, 2.0, 4.0]


async def test_sign_in_sets_a_strict_http_only_session(
    console: tuple[httpx.AsyncClient, Services],
) -> None:
    http, resources = console
    await seed(resources)
    response = await sign_in(http)
    assert response.status_code == 303
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie
    assert "samesite=strict" in cookie
    assert ADMIN_TOKEN not in response.headers["set-cookie"]
    page = await http.get("/admin")
    assert page.status_code == 200
    assert page.headers["cache-control"] == "no-store"
    assert 'data-testid="portal-1001"' in page.text
    assert "needs re-authorization" in page.text
    filtered = await http.get("/admin", params={"status": "needs_reauth"})
    assert 'data-testid="portal-1002"' in filtered.text
    assert 'data-testid="portal-1001"' not in filtered.text
    searched = await http.get("/admin", params={"q": "acme"})
    assert 'data-testid="portal-1001"' in searched.text
    assert 'data-testid="portal-1002"' not in searched.text


async def test_a_forged_session_cookie_is_refused(
    console: tuple[httpx.AsyncClient, Services],
) -> None:
    http, _ = console
    await sign_in(http)
    value = http.cookies.get("hubline_admin", path="/admin")
    assert value
    expires, nonce, signature = value.split(".")
    http.cookies.clear()
    http.cookies.set("hubline_admin", f"{int(expires) + 99999}.{nonce}.{signature}", path="/admin")
    assert (await http.get("/admin")).status_code == 401


async def test_forms_without_the_csrf_token_are_refused(
    console: tuple[httpx.AsyncClient, Services],
) -> None:
    http, resources = console
    seeded = await seed(resources)
    await sign_in(http)
    response = await http.post(
        "/admin/portals/1001/retry", data={"event_id": str(seeded["failed_event"])}
    )
    assert response.status_code == 403
    async with resources.sessions() as session:
        event = await session.get(InboxEvent, seeded["failed_event"])
    assert event is not None
    assert event.status == EventStatus.failed


async def test_a_forged_or_garbled_csrf_token_is_a_403_not_a_crash(
    console: tuple[httpx.AsyncClient, Services],
) -> None:
    http, resources = console
    seeded = await seed(resources)
    await sign_in(http)
    for forged in ("é-not-ascii", "0" * 64, ""):
        response = await http.post(
            "/admin/portals/1001/retry",
            data={"csrf": forged, "event_id": str(seeded["failed_event"])},
        )
        assert response.status_code == 403


async def test_signing_out_takes_the_pages_csrf_token(
    console: tuple[httpx.AsyncClient, Services],
) -> None:
    http, resources = console
    await seed(resources)
    await sign_in(http)
    page = await http.get("/admin")
    # Another site's form cannot sign the operator out.
    assert (await http.post("/admin/logout")).status_code == 403
    assert (await http.get("/admin")).status_code == 200
    signed_out = await http.post("/admin/logout", data={"csrf": csrf_of(page.text)})
    assert signed_out.status_code == 303
    assert (await http.get("/admin")).status_code == 401


async def test_a_signed_out_session_cookie_no_longer_works_anywhere(
    console: tuple[httpx.AsyncClient, Services],
) -> None:
    """A copy of the cookie (another tab, a stolen one) ends with the sign-out, not 8 hours on."""
    http, resources = console
    seeded = await seed(resources)
    await sign_in(http)
    kept = http.cookies["hubline_admin"]
    page = await http.get("/admin/portals/1001")
    csrf = csrf_of(page.text)
    await sign_in(http)  # a second session, in another browser, stays signed in
    other = http.cookies["hubline_admin"]
    async with transaction(resources.sessions) as session:
        # A sign-out record whose session has long expired, and app state that is not one.
        session.add(AppState(name=SIGNED_OUT + "long-ago", value="000000000001"))
        session.add(AppState(name="journal.offset", value="not-a-number"))
    http.cookies.set("hubline_admin", kept, path="/admin")
    assert (await http.post("/admin/logout", data={"csrf": csrf})).status_code == 303
    async with resources.sessions() as session:
        names = set((await session.execute(sa.select(col(AppState.name)))).scalars())
    assert SIGNED_OUT + "long-ago" not in names
    assert "journal.offset" in names
    assert len([n for n in names if n.startswith(SIGNED_OUT)]) == 1

    http.cookies.set("hubline_admin", kept, path="/admin")
    assert (await http.get("/admin/portals/1001")).status_code == 401
    retried = await http.post(
        "/admin/portals/1001/retry", data={"csrf": csrf, "event_id": str(seeded["failed_event"])}
    )
    assert retried.status_code == 401
    http.cookies.set("hubline_admin", other, path="/admin")
    assert (await http.get("/admin/portals/1001")).status_code == 200


@pytest.mark.parametrize(
    ("public_url", "secure"), [("https://hubline.example", True), ("http://localhost:8000", False)]
)
async def test_the_session_cookie_is_secure_whenever_hubline_is_served_over_https(
    make_settings: Callable[..., Settings], public_url: str, secure: bool
) -> None:
    # Behind a TLS-terminating proxy the request itself arrives as plain http.
    async with serving(make_settings(admin_token=ADMIN_TOKEN, public_url=public_url)) as (
        http,
        _,
    ):
        response = await sign_in(http)
    assert response.status_code == 303
    assert ("; secure" in response.headers["set-cookie"].lower()) is secure


async def test_retry_a_failed_event_from_the_portal_page(
    console: tuple[httpx.AsyncClient, Services],
) -> None:
    http, resources = console
    seeded = await seed(resources)
    await sign_in(http)
    page = await http.get("/admin/portals/1001")
    assert page.status_code == 200
    assert "HubSpot rejected the email" in page.text
    response = await http.post(
        "/admin/portals/1001/retry",
        data={"csrf": csrf_of(page.text), "event_id": str(seeded["failed_event"])},
    )
    # Post, redirect, get: a reload shows the page instead of doing the action again, and
    # the page's filter links are links to the page (from the action's URL they were 405s).
    assert response.status_code == 303
    shown = await http.get(response.headers["location"])
    assert "Queued 1 failed event(s) again." in shown.text
    link = re.search(r'href="([^"]+)" data-testid="source-receptionist"', shown.text)
    assert link is not None
    assert (await http.get(link.group(1))).status_code == 200
    async with resources.sessions() as session:
        event = await session.get(InboxEvent, seeded["failed_event"])
    assert event is not None
    assert event.status == EventStatus.pending


async def test_rotating_the_secret_shows_the_new_one_once(
    console: tuple[httpx.AsyncClient, Services],
) -> None:
    http, resources = console
    await seed(resources)
    await sign_in(http)
    page = await http.get("/admin/portals/1001")
    response = await http.post(
        "/admin/portals/1001/rotate-secret", data={"csrf": csrf_of(page.text)}
    )
    shown = re.search(r'data-testid="new-secret">([^<]+)<', response.text)
    assert shown
    assert shown.group(1).startswith("whsec_")
    async with resources.sessions() as session:
        secrets = [
            s.reveal()
            for s in await accepted_secrets(1001, session=session, cipher=resources.cipher)
        ]
    assert secrets[0] == shown.group(1)
    assert len(secrets) == 2, "the old secret keeps working during the grace period"
    assert shown.group(1) not in (await http.get("/admin/portals/1001")).text


async def test_disconnect_needs_confirmation(console: tuple[httpx.AsyncClient, Services]) -> None:
    http, resources = console
    await seed(resources)
    await sign_in(http)
    page = await http.get("/admin/portals/1001")
    response = await http.post("/admin/portals/1001/disconnect", data={"csrf": csrf_of(page.text)})
    assert response.status_code == 400
    async with resources.sessions() as session:
        portal = await session.get(Portal, 1001)
    assert portal is not None
    assert portal.status == PortalStatus.active


async def test_rerun_provisioning_queues_a_job(console: tuple[httpx.AsyncClient, Services]) -> None:
    http, resources = console
    await seed(resources)
    await sign_in(http)
    page = await http.get("/admin/portals/1001")
    response = await http.post(
        "/admin/portals/1001/provision", data={"csrf": csrf_of(page.text)}, follow_redirects=True
    )
    assert "Properties provisioning queued." in response.text
    async with resources.sessions() as session:
        jobs = (
            (
                await session.execute(
                    sa.select(InboxEvent).where(col(InboxEvent.type) == "properties.provision")
                )
            )
            .scalars()
            .all()
        )
    assert [(job.portal_id, job.status) for job in jobs] == [(1001, EventStatus.pending)]


async def test_the_portal_page_filters_events_by_source(
    console: tuple[httpx.AsyncClient, Services],
) -> None:
    http, resources = console
    seeded = await seed(resources)
    async with transaction(resources.sessions) as session:
        hubspot = await enqueue(
            NewEvent(
                1001, EventSource.hubspot, "contact.creation", "hs-1", utcnow(), {"objectId": 7}
            ),
            session=session,
            cipher=resources.cipher,
        )
    await sign_in(http)
    everything = await http.get("/admin/portals/1001")
    assert f'data-testid="event-{hubspot.event_id}"' in everything.text
    assert f'data-testid="event-{seeded["failed_event"]}"' in everything.text
    receptionist = await http.get("/admin/portals/1001", params={"source": "receptionist"})
    assert f'data-testid="event-{hubspot.event_id}"' not in receptionist.text
    assert f'data-testid="event-{seeded["failed_event"]}"' in receptionist.text


async def test_numbers_out_of_range_name_nothing_instead_of_failing(
    console: tuple[httpx.AsyncClient, Services],
) -> None:
    """Ids past BIGINT, and digits that are not ASCII, are answered like any unknown id."""
    http, resources = console
    seeded = await seed(resources)
    huge = "9" * 20
    api = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert (await http.get(f"/admin/api/portals/{huge}", headers=api)).json() == {
        "error": "not_found",
        "detail": f"no portal {huge}",
    }
    assert (await http.post(f"/admin/api/portals/{huge}/retry", headers=api)).status_code == 404
    retried = await http.post(
        "/admin/api/portals/1001/retry", headers=api, json={"event_ids": [int(huge)]}
    )
    assert retried.json() == {"retried": 0}

    # Past 4,300 digits int() itself refuses: the routes' int convertor made that a 500
    # (before the token was asked for), as it did a `refresh` that long.
    giant = "9" * 4301
    assert (await http.get(f"/admin/api/portals/{giant}")).status_code == 401
    assert (await http.get(f"/admin/api/portals/{giant}", headers=api)).json() == {
        "error": "not_found",
        "detail": f"no portal {'9' * 24}…",
    }
    assert (await http.post(f"/admin/api/portals/{giant}/retry", headers=api)).status_code == 404
    # A body nested past the JSON reader's recursion limit is malformed, not a 500.
    nested = b"[" * 100_000 + b"]" * 100_000
    assert (
        await http.post("/admin/api/portals/1001/retry", headers=api, content=nested)
    ).status_code == 400

    await sign_in(http)
    assert (await http.get(f"/admin/portals/{huge}")).status_code == 404
    assert (await http.get(f"/admin/portals/{giant}")).status_code == 404
    for refresh in ("9" * 400, "9" * 5000, "²", "5000"):
        assert (await http.get("/admin", params={"refresh": refresh})).status_code == 200
    # A search longer than any domain (SQLite refused the pattern: a 503 "database
    # unreachable") or holding a NUL (PostgreSQL refused it: a 500) finds nothing.
    for search in ("a" * 60_000, "\x00"):
        assert (await http.get("/admin", params={"q": search})).status_code == 200
    found = (await http.get("/admin", params={"q": "acme\x00"})).text
    assert "acme-dental.example" in found
    assert "bright.example" not in found
    page = await http.get("/admin/portals/1001")
    csrf = csrf_of(page.text)
    assert (
        await http.post(f"/admin/portals/{huge}/retry", data={"csrf": csrf, "event_id": "1"})
    ).status_code == 404
    # An event id that names no event retries none (it used to mean "all of them").
    for event_id in ("²", huge, "abc"):
        response = await http.post(
            "/admin/portals/1001/retry",
            data={"csrf": csrf, "event_id": event_id},
            follow_redirects=True,
        )
        assert "Queued 0 failed event(s) again." in response.text
    response = await http.post(
        "/admin/portals/1001/retry",
        data={"csrf": csrf, "event_id": str(seeded["failed_event"])},
        follow_redirects=True,
    )
    assert "Queued 1 failed event(s) again." in response.text
    # The notice is chosen by a code; the count, a number: nothing of the URL is echoed.
    echoed = await http.get("/admin/portals/1001", params={"done": "<b>x</b>", "count": "<i>"})
    assert "<b>x</b>" not in echoed.text
    assert "&lt;b&gt;" not in echoed.text
