"""The install flow against the sandbox: /oauth/install → HubSpot's consent → /oauth/callback."""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import sqlalchemy as sa
from asgi_lifespan import LifespanManager
from sqlmodel import col

from app.main import create_app
from app.models import EventStatus, InboxEvent, OAuthState, Portal, utcnow
from app.oauth import safe_return_url
from app.portals import accepted_secrets
from app.sandbox.limits import Fault
from app.tokens import load_tokens
from tests.conftest import HUBLINE_URL, TEST_CLIENT_ID, approve_in_sandbox, settings_page_value
from tests.support_hubline import assert_none_stored, stored_text, table_count


async def start_install(client: httpx.AsyncClient) -> str:
    started = await client.get("/oauth/install")
    assert started.status_code == 302
    return str(started.headers["location"])


async def approved_callback(
    client: httpx.AsyncClient, sandbox_app: Any, portal_id: int = 1001
) -> str:
    return await approve_in_sandbox(sandbox_app, await start_install(client), portal_id)


def with_param(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query.update(params)
    return parts._replace(query=str(httpx.QueryParams(query))).geturl()


def without_param(url: str, name: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items() if k != name}
    return parts._replace(query=str(httpx.QueryParams(query))).geturl()


async def test_landing_page_offers_install_and_manage(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200
    # At PUBLIC_URL, whatever name the page was opened by: the install's cookie must be
    # set on the host HubSpot sends the browser back to.
    assert page.text.count('href="http://hubline.test/oauth/install"') == 2
    assert "Manage" in page.text


async def test_install_redirects_to_authorize_with_scopes_and_a_browser_bound_state(
    client: httpx.AsyncClient, settings: Any, services: Any
) -> None:
    started = await client.get("/oauth/install")
    assert started.status_code == 302
    location = urlsplit(started.headers["location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == (
        "http://sandbox.test/oauth/authorize"
    )
    query = parse_qs(location.query)
    assert query["client_id"] == [TEST_CLIENT_ID]
    assert query["redirect_uri"] == ["http://hubline.test/oauth/callback"]
    assert query["scope"][0].split() == settings.required_scopes
    assert query["optional_scope"][0].split() == settings.optional_scopes
    assert len(query["state"][0]) >= 43  # 256 random bits, base64url
    assert "code_challenge" not in query  # PKCE is off by default
    cookie = started.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=lax" in cookie or "SameSite=Lax" in cookie
    assert "Secure" not in cookie  # PUBLIC_URL is http here
    async with services.sessions() as session:
        state = (await session.execute(sa.select(OAuthState))).scalar_one()
    # Only a hash is stored, valid for ten minutes.
    assert state.state_hash != query["state"][0]
    assert timedelta(minutes=9) < state.expires_at - utcnow() <= timedelta(minutes=10)


def _attributes(set_cookie: str) -> dict[str, str]:
    """A Set-Cookie header's attributes by lower-case name (the name=value pair left out)."""
    pairs = (part.partition("=") for part in set_cookie.split(";")[1:])
    return {name.strip().lower(): value.strip() for name, _, value in pairs}


async def test_behind_https_the_cookies_are_this_hosts_alone_and_a_planted_one_is_not_read(
    make_settings: Any, sandbox_app: Any
) -> None:
    """Over https the install binding and the settings session are `__Host-` cookies, which
    a sibling subdomain cannot plant; a binding planted under the plain name is not read,
    so an install someone else approved never opens in a browser they planted it in."""
    public_url = "https://hubline.example"
    app = create_app(
        make_settings(public_url=public_url), transport=httpx.ASGITransport(app=sandbox_app)
    )

    def browser(**cookies: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=public_url, cookies=cookies
        )

    planted = "K" * 43
    async with (
        LifespanManager(app),
        browser() as victim,
        browser(hubline_oauth=planted) as attacker,
    ):
        started = await attacker.get("/oauth/install")
        cookie = started.headers["set-cookie"]
        assert cookie.startswith("__Host-hubline_oauth=")
        assert planted not in cookie  # a fresh binding, not the planted one
        assert _attributes(cookie)["path"] == "/"
        assert {"secure", "httponly"} <= _attributes(cookie).keys()
        assert "domain" not in _attributes(cookie)
        callback = await approve_in_sandbox(sandbox_app, started.headers["location"], 1001)

        victim.cookies.set("hubline_oauth", planted)
        refused = await victim.get(callback)
        assert refused.status_code == 400
        assert settings_page_value(refused.text, "error-reason") == "missing_cookie"

        page = await attacker.get(callback)
        assert page.status_code == 200, page.text
        session = next(
            value
            for value in page.headers.get_list("set-cookie")
            if value.startswith("__Host-hubline_portal=")
        )
        assert _attributes(session)["path"] == "/"
        assert {"secure", "httponly"} <= _attributes(session).keys()
        assert "domain" not in _attributes(session)
        assert (await attacker.get("/settings")).status_code == 200
        # The attacker's settings session, planted under the plain name, opens nothing.
        victim.cookies.set("hubline_portal", attacker.cookies["__Host-hubline_portal"])
        assert (await victim.get("/settings")).status_code == 401


async def test_three_portals_install_with_their_own_encrypted_tokens_and_secrets(
    install_portal: Any, services: Any, sandbox: Any, database_url: str
) -> None:
    installed = [await install_portal(portal_id) for portal_id in (1001, 1002, 1003)]

    assert [p.webhook_url for p in installed] == [
        f"{HUBLINE_URL}/webhooks/portals/{pid}/receptionist" for pid in (1001, 1002, 1003)
    ]
    assert len({p.webhook_secret for p in installed}) == 3
    assert all(p.webhook_secret.startswith("whsec_") for p in installed)
    async with services.sessions() as session:
        portals = (
            await session.execute(sa.select(Portal).order_by(col(Portal.portal_id)))
        ).scalars()
        assert [(p.portal_id, p.status, p.install_generation) for p in portals] == [
            (1001, "active", 1),
            (1002, "active", 1),
            (1003, "active", 1),
        ]
        tokens = [
            await load_tokens(pid, session=session, cipher=services.cipher)
            for pid in (1001, 1002, 1003)
        ]
        for portal in installed:
            secrets = await accepted_secrets(
                portal.portal_id, session=session, cipher=services.cipher
            )
            assert [s.reveal() for s in secrets] == [portal.webhook_secret]
    issued = {t.token: t.portal_id for t in sandbox.access_tokens.values()}
    for token_set in tokens:
        assert token_set is not None
        assert issued[token_set.access_token.reveal()] == token_set.portal_id
    # The starter-tier portal's optional marketing scopes were dropped, and recorded so.
    async with services.sessions() as session:
        starter = await session.get(Portal, 1003)
        full = await session.get(Portal, 1001)
    assert starter is not None
    assert full is not None
    assert "crm.objects.marketing_events.write" not in starter.scope_set
    assert "crm.objects.marketing_events.write" in full.scope_set
    assert full.hub_domain == "acme-dental.sandbox.hubspot.test"
    # Each install queued its property provisioning.
    assert await table_count(services.engine, "events", "WHERE type = 'properties.provision'") == 3

    everything = await stored_text(database_url)
    assert_none_stored(everything, sandbox.issued_secrets())
    assert_none_stored(everything, [p.webhook_secret for p in installed])


async def test_settings_page_is_not_cached_and_opens_a_portal_session(
    client: httpx.AsyncClient, sandbox_app: Any
) -> None:
    page = await client.get(await approved_callback(client, sandbox_app))
    assert page.status_code == 200
    assert page.headers["cache-control"] == "no-store"
    cookies = page.headers.get_list("set-cookie")
    session_cookie = next(c for c in cookies if c.startswith("hubline_portal="))
    assert "HttpOnly" in session_cookie
    assert "Max-Age=1800" in session_cookie
    assert settings_page_value(page.text, "portal-status") == "active"
    assert 'data-copy="webhook-secret"' in page.text  # a copy button


async def test_portal_identity_comes_from_the_token_never_from_the_query(
    client: httpx.AsyncClient, sandbox_app: Any, services: Any
) -> None:
    callback = with_param(await approved_callback(client, sandbox_app, 1002), portalId="1001")
    page = await client.get(callback)
    assert page.status_code == 200
    assert settings_page_value(page.text, "webhook-url").endswith("/portals/1002/receptionist")
    async with services.sessions() as session:
        assert await session.get(Portal, 1001) is None


# --- every failure: a 4xx page, no needless exchange, no portal -------------------------


async def assert_nothing_installed(services: Any, sandbox: Any, *, exchanges: int = 0) -> None:
    assert await table_count(services.engine, "portals") == 0
    assert await table_count(services.engine, "oauth_tokens") == 0
    assert await table_count(services.engine, "receptionist_secrets") == 0
    assert sum(sandbox.exchange_count.values()) == exchanges


async def test_callback_says_what_hubspots_error_means_not_what_the_link_says(
    client: httpx.AsyncClient, services: Any, sandbox: Any
) -> None:
    """The description rides in the link, which anyone can write: shown on Hubline's own
    page it could tell the visitor anything (call this number, visit that site)."""
    page = await client.get(
        "/oauth/callback?error=access_denied&error_description=Your+account+is+suspended."
        "+Call+%2B1+900+555+0199"
    )
    assert page.status_code == 400
    assert "was not approved" in settings_page_value(page.text, "error-message")
    assert "suspended" not in page.text
    assert settings_page_value(page.text, "error-reason") == "hubspot_error"
    unknown = await client.get("/oauth/callback?error=made_up&error_description=Visit+evil")
    assert unknown.status_code == 400
    assert "evil" not in unknown.text
    assert "made_up" not in unknown.text
    await assert_nothing_installed(services, sandbox)


async def test_callback_rejects_a_state_without_its_cookie(
    client: httpx.AsyncClient, hubline_app: Any, sandbox_app: Any, services: Any, sandbox: Any
) -> None:
    callback = await approved_callback(client, sandbox_app)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=hubline_app), base_url=HUBLINE_URL
    ) as other_browser:
        page = await other_browser.get(callback)
    assert page.status_code == 400
    assert settings_page_value(page.text, "error-reason") == "missing_cookie"
    await assert_nothing_installed(services, sandbox)


async def test_callback_rejects_a_state_bound_to_another_browser_without_using_it_up(
    client: httpx.AsyncClient, hubline_app: Any, sandbox_app: Any, services: Any, sandbox: Any
) -> None:
    callback = await approved_callback(client, sandbox_app)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=hubline_app), base_url=HUBLINE_URL
    ) as attacker:
        await attacker.get("/oauth/install")  # has a cookie of its own
        page = await attacker.get(callback)
    assert page.status_code == 403
    assert settings_page_value(page.text, "error-reason") == "state_mismatch"
    await assert_nothing_installed(services, sandbox)
    # Whoever saw the URL cannot cancel the install: the browser that started it finishes.
    finished = await client.get(callback)
    assert finished.status_code == 200
    assert sum(sandbox.exchange_count.values()) == 1


async def test_callback_rejects_an_unknown_state(
    client: httpx.AsyncClient, sandbox_app: Any, services: Any, sandbox: Any
) -> None:
    callback = with_param(await approved_callback(client, sandbox_app), state="forged-state")
    page = await client.get(callback)
    assert page.status_code == 400
    assert settings_page_value(page.text, "error-reason") == "unknown_state"
    await assert_nothing_installed(services, sandbox)


async def test_callback_rejects_an_expired_state(
    client: httpx.AsyncClient, sandbox_app: Any, services: Any, sandbox: Any
) -> None:
    callback = await approved_callback(client, sandbox_app)
    async with services.sessions() as session, session.begin():
        await session.execute(
            sa.update(OAuthState).values(expires_at=utcnow() - timedelta(seconds=1))
        )
    page = await client.get(callback)
    assert page.status_code == 400
    assert settings_page_value(page.text, "error-reason") == "expired_state"
    await assert_nothing_installed(services, sandbox)


async def test_callback_rejects_reused_state(
    client: httpx.AsyncClient, sandbox_app: Any, services: Any, sandbox: Any
) -> None:
    callback = await approved_callback(client, sandbox_app)
    assert (await client.get(callback)).status_code == 200
    again = await client.get(callback)
    assert again.status_code == 400
    assert settings_page_value(again.text, "error-reason") == "unknown_state"
    assert sum(sandbox.exchange_count.values()) == 1


async def test_callback_without_a_code_fails(
    client: httpx.AsyncClient, sandbox_app: Any, services: Any, sandbox: Any
) -> None:
    callback = without_param(await approved_callback(client, sandbox_app), "code")
    page = await client.get(callback)
    assert page.status_code == 400
    assert settings_page_value(page.text, "error-reason") == "missing_code"
    await assert_nothing_installed(services, sandbox)
    bare = await client.get("/oauth/callback")
    assert bare.status_code == 400


async def test_callback_with_a_code_hubspot_refuses_fails(
    client: httpx.AsyncClient, sandbox_app: Any, services: Any, sandbox: Any
) -> None:
    callback = with_param(await approved_callback(client, sandbox_app), code="not-a-real-code")
    page = await client.get(callback)
    assert page.status_code == 400
    assert settings_page_value(page.text, "error-reason") == "exchange_rejected"
    await assert_nothing_installed(services, sandbox)


async def test_callback_when_the_token_endpoint_fails_installs_nothing(
    client: httpx.AsyncClient, sandbox_app: Any, services: Any, sandbox: Any
) -> None:
    callback = await approved_callback(client, sandbox_app)
    sandbox.faults.append(Fault(count=1, status=503, path_prefix="/oauth/v3/token"))
    page = await client.get(callback)
    assert page.status_code == 400
    assert settings_page_value(page.text, "error-reason") == "exchange_failed"
    await assert_nothing_installed(services, sandbox)


class TimeoutOnTokenEndpoint(httpx.AsyncBaseTransport):
    """The sandbox, except that the token endpoint never answers."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/oauth/v3/token":
            raise httpx.ReadTimeout("timed out", request=request)
        return await self.inner.handle_async_request(request)


async def test_callback_when_the_token_endpoint_times_out_installs_nothing(
    settings: Any, sandbox_app: Any, sandbox: Any
) -> None:
    app = create_app(
        settings, transport=TimeoutOnTokenEndpoint(httpx.ASGITransport(app=sandbox_app))
    )
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=HUBLINE_URL) as browser,
    ):
        page = await browser.get(await approved_callback(browser, sandbox_app))
        assert page.status_code == 400
        assert settings_page_value(page.text, "error-reason") == "exchange_failed"
        await assert_nothing_installed(app.state.services, sandbox)


async def test_twenty_concurrent_callbacks_with_one_state_make_one_exchange(
    client: httpx.AsyncClient, sandbox_app: Any, services: Any, sandbox: Any
) -> None:
    callback = await approved_callback(client, sandbox_app)
    pages = await asyncio.gather(*(client.get(callback) for _ in range(20)))
    statuses = sorted(page.status_code for page in pages)
    assert statuses == [200] + [400] * 19
    assert sum(sandbox.exchange_count.values()) == 1
    assert await table_count(services.engine, "portals") == 1


# --- installs that begin on the marketplace listing ---------------------------------------


async def marketplace_callback(sandbox_app: Any, settings: Any, portal_id: int) -> str:
    """HubSpot's listing flow: its consent screen, then the redirect with a code and no state."""
    from app.sandbox.testing import authorize

    config = sandbox_app.state.sandbox.config
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=sandbox_app), base_url="http://sandbox.test"
    ) as hubspot:
        approved = await authorize(
            hubspot,
            config,
            portal_id,
            redirect_uri=settings.redirect_uri,
            scope=settings.hubspot_scopes,
            optional_scope=settings.hubspot_optional_scopes,
            state=None,
        )
    assert approved.status_code == 302
    return str(approved.headers["location"])


async def test_marketplace_initiated_install_completes_and_the_secret_waits_for_a_bound_flow(
    hubline_app: Any, sandbox_app: Any, settings: Any, services: Any
) -> None:
    callback = await marketplace_callback(sandbox_app, settings, 1002)
    assert "state=" not in callback
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=hubline_app), base_url=HUBLINE_URL
    ) as fresh_browser:  # never visited /oauth/install: no cookie
        page = await fresh_browser.get(callback)
        assert page.status_code == 200
        async with services.sessions() as session:
            portal = await session.get(Portal, 1002)
        assert portal is not None
        assert portal.status == "active"
        assert settings_page_value(page.text, "installed-portal") == "1002"
        # Nothing shows this browser's user made the install (a link with someone else's
        # code looks the same): no secret, no settings session.
        [secret] = await secrets_of(services, 1002)
        assert secret not in page.text
        assert 'data-testid="webhook-secret"' not in page.text
        assert "hubline_portal" not in fresh_browser.cookies
        assert page.headers["cache-control"] == "no-store"

        # The page's button runs the state-bound flow; HubSpot confirms the account.
        continue_url = page_link(page.text, "continue-setup")
        started = await fresh_browser.get(continue_url)
        assert started.status_code == 302
        back = await approve_in_sandbox(sandbox_app, started.headers["location"], 1002)
        settings_page = await fresh_browser.get(back)
    assert settings_page.status_code == 200
    assert settings_page_value(settings_page.text, "webhook-url").endswith(
        "/portals/1002/receptionist"
    )
    assert settings_page_value(settings_page.text, "webhook-secret") == secret


def page_link(page: str, testid: str) -> str:
    match = re.search(rf'href="([^"]*)"[^>]*data-testid="{testid}"', page)
    assert match is not None, f"no link with data-testid={testid!r}"
    return match.group(1)


async def secrets_of(services: Any, portal_id: int) -> list[str]:
    async with services.sessions() as session:
        secrets = await accepted_secrets(portal_id, session=session, cipher=services.cipher)
    return [secret.reveal() for secret in secrets]


async def test_return_url_off_hubspots_domain_is_neither_followed_nor_linked(
    client: httpx.AsyncClient, sandbox_app: Any, settings: Any
) -> None:
    callback = await marketplace_callback(sandbox_app, settings, 1001)
    page = await client.get(with_param(callback, returnUrl="https://evil.example/phish"))
    assert page.status_code == 200
    assert "evil.example" not in page.text
    assert 'data-testid="return-url"' not in page.text


async def test_return_url_on_hubspots_domain_is_linked(
    client: httpx.AsyncClient, sandbox_app: Any, settings: Any
) -> None:
    back = "https://app.hubspot.com/ecosystem/1001/marketplace/apps"
    callback = await marketplace_callback(sandbox_app, settings, 1001)
    page = await client.get(with_param(callback, returnUrl=back))
    assert page.status_code == 200
    assert settings_page_value(page.text, "return-url") == "Back to HubSpot"
    assert f'href="{back}"' in page.text


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://app.hubspot.com/contacts/1001", True),
        ("https://app-eu1.hubspot.com/contacts/1001", True),
        ("http://app.hubspot.com/", False),
        ("https://app.hubspot.com.evil.example/", False),
        ("https://evil.example/?https://app.hubspot.com", False),
        ("https://user@app.hubspot.com/", False),
        ("https://app.hubspot.com:8443/", False),
        ("//app.hubspot.com/", False),
        ("javascript:alert(1)", False),
        ("", False),
    ],
)
def test_only_hubspot_app_domains_are_safe_return_urls(url: str, allowed: bool) -> None:
    assert (safe_return_url(url) == url) is allowed


# --- PKCE, reinstall ------------------------------------------------------------------------


async def test_pkce_is_sent_and_enforced_when_enabled(
    make_settings: Any, sandbox_app: Any, sandbox: Any
) -> None:
    app = create_app(
        make_settings(hubspot_pkce=True), transport=httpx.ASGITransport(app=sandbox_app)
    )
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=HUBLINE_URL) as browser,
    ):
        authorize_url = await start_install(browser)
        query = parse_qs(urlsplit(authorize_url).query)
        assert query["code_challenge_method"] == ["S256"]
        async with app.state.services.sessions() as session:
            state = (await session.execute(sa.select(OAuthState))).scalar_one()
        assert state.code_verifier_ct is not None  # stored encrypted, never in the clear
        callback = await approve_in_sandbox(sandbox_app, authorize_url, 1001)
        code = parse_qs(urlsplit(callback).query)["code"][0]
        assert sandbox.codes[code].code_challenge == query["code_challenge"][0]
        page = await browser.get(callback)
    assert page.status_code == 200


async def test_reinstall_keeps_the_secret_and_starts_a_new_generation(
    install_portal: Any, services: Any, sandbox: Any
) -> None:
    first = await install_portal(1001)
    second = await install_portal(1001)
    assert second.webhook_secret == first.webhook_secret
    assert "Welcome back" in second.page
    async with services.sessions() as session:
        portal = await session.get(Portal, 1001)
        tokens = await load_tokens(1001, session=session, cipher=services.cipher)
    assert portal is not None
    assert tokens is not None
    assert portal.install_generation == 2
    assert tokens.install_generation == 2
    assert sum(sandbox.exchange_count.values()) == 2
    provisioning = await table_count(
        services.engine, "events", "WHERE type = 'properties.provision'"
    )
    assert provisioning == 2


async def test_reinstall_resumes_parked_events(install_portal: Any, services: Any) -> None:
    from app.inbox import park_portal_events

    await install_portal(1001)
    async with services.sessions() as session, session.begin():
        await park_portal_events(1001, session=session)
    await install_portal(1001)
    async with services.sessions() as session:
        statuses = (
            (
                await session.execute(
                    sa.select(col(InboxEvent.status)).where(col(InboxEvent.portal_id) == 1001)
                )
            )
            .scalars()
            .all()
        )
    assert statuses
    assert set(statuses) == {EventStatus.pending}
