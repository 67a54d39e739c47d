"""OAuth as HubSpot does it: authorize page, codes, tokens, refresh, revoke, expiry, uninstall."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from app.sandbox import ManualClock
from app.sandbox.testing import authorize, code_from, pkce_pair
from tests.sandbox.conftest import Sandbox, bearer

REDIRECT = "http://localhost:8000/oauth/callback"
REQUIRED = "oauth crm.objects.contacts.read crm.objects.contacts.write"
MARKETING = "crm.objects.marketing_events.read crm.objects.marketing_events.write"


def query_of(location: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(location).query)


async def exchange(sandbox: Sandbox, code: str, **overrides: str) -> dict[str, object]:
    form = {
        "grant_type": "authorization_code",
        "client_id": sandbox.config.client_id,
        "client_secret": sandbox.config.client_secret,
        "redirect_uri": REDIRECT,
        "code": code,
        **overrides,
    }
    response = await sandbox.client.post("/oauth/v3/token", data=form)
    return {"http": response.status_code, **response.json()}


async def refresh(sandbox: Sandbox, refresh_token: str) -> dict[str, object]:
    form = {
        "grant_type": "refresh_token",
        "client_id": sandbox.config.client_id,
        "client_secret": sandbox.config.client_secret,
        "refresh_token": refresh_token,
    }
    response = await sandbox.client.post("/oauth/v3/token", data=form)
    return {"http": response.status_code, **response.json()}


async def test_authorize_page_lists_portals_with_approve_buttons(sandbox: Sandbox) -> None:
    response = await sandbox.client.get(
        "/oauth/authorize",
        params={"client_id": sandbox.config.client_id, "redirect_uri": REDIRECT, "scope": REQUIRED},
    )

    assert response.status_code == 200
    for portal_id in (1001, 1002, 1003):
        assert f'data-testid="approve-{portal_id}"' in response.text
    assert 'data-testid="deny"' in response.text


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"client_id": "nope", "redirect_uri": REDIRECT, "scope": REQUIRED}, "client_id"),
        (
            {"client_id": "sandbox-client-id", "redirect_uri": "not a url", "scope": REQUIRED},
            "redirect_uri",
        ),
        (
            {"client_id": "sandbox-client-id", "redirect_uri": "ftp://x/cb", "scope": REQUIRED},
            "redirect_uri",
        ),
    ],
)
async def test_authorize_with_bad_client_or_redirect_shows_an_error_page(
    sandbox: Sandbox, params: dict[str, str], reason: str
) -> None:
    response = await sandbox.client.get("/oauth/authorize", params=params)

    assert response.status_code == 400
    assert "location" not in response.headers
    assert reason in response.text


async def test_approve_redirects_with_code_and_state(sandbox: Sandbox) -> None:
    response = await authorize(sandbox.client, sandbox.config, 1001, state="xyz")

    assert response.status_code == 302
    location = response.headers["location"]
    assert location.startswith(REDIRECT + "?")
    query = query_of(location)
    assert query["state"] == ["xyz"]
    assert len(query["code"][0]) >= 32
    assert sandbox.state.portal(1001).installed


async def test_marketplace_install_without_state_redirects_without_state(sandbox: Sandbox) -> None:
    response = await authorize(sandbox.client, sandbox.config, 1002, state=None)

    query = query_of(response.headers["location"])
    assert "state" not in query
    assert "code" in query


async def test_deny_redirects_with_access_denied(sandbox: Sandbox) -> None:
    form = {
        "client_id": sandbox.config.client_id,
        "redirect_uri": REDIRECT,
        "scope": REQUIRED,
        "state": "s1",
    }
    response = await sandbox.client.post("/oauth/authorize/deny", data=form)

    query = query_of(response.headers["location"])
    assert response.status_code == 302
    assert query["error"] == ["access_denied"]
    assert query["error_description"]
    assert query["state"] == ["s1"]


async def test_required_scope_the_tier_lacks_redirects_with_an_error(sandbox: Sandbox) -> None:
    response = await authorize(
        sandbox.client, sandbox.config, 1003, scope=f"{REQUIRED} {MARKETING}", optional_scope=""
    )

    query = query_of(response.headers["location"])
    assert query["error"] == ["invalid_scope"]
    assert "marketing_events" in query["error_description"][0]
    assert not sandbox.state.portal(1003).installed


async def test_optional_scopes_the_tier_lacks_are_dropped(sandbox: Sandbox) -> None:
    starter = await sandbox.install(1003)
    full = await sandbox.install(1001)

    assert "crm.objects.marketing_events.write" not in starter["scopes"]
    assert "crm.objects.contacts.write" in starter["scopes"]
    assert "crm.objects.marketing_events.write" in full["scopes"]


async def test_code_exchange_answers_hubspots_token_shape(sandbox: Sandbox) -> None:
    code = code_from(await authorize(sandbox.client, sandbox.config, 1001))

    answer = await exchange(sandbox, code)

    assert answer["http"] == 200
    assert answer["token_type"] == "bearer"
    assert answer["expires_in"] == 1800
    assert answer["hub_id"] == 1001
    assert answer["token_use"] == "access_token"
    assert len(str(answer["access_token"])) >= 64
    assert answer["refresh_token"]
    assert isinstance(answer["scopes"], list)
    assert sandbox.state.exchange_count[1001] == 1


async def test_code_is_single_use(sandbox: Sandbox) -> None:
    code = code_from(await authorize(sandbox.client, sandbox.config, 1001))
    first = await exchange(sandbox, code)

    second = await exchange(sandbox, code)

    assert first["http"] == 200
    assert second["http"] == 400
    assert second["error"] == "invalid_grant"
    assert second["status"] == "BAD_AUTH_CODE"
    assert "already been used" in str(second["error_description"])


async def test_code_expires(sandbox: Sandbox, clock: ManualClock) -> None:
    code = code_from(await authorize(sandbox.client, sandbox.config, 1001))
    clock.advance(sandbox.config.code_lifetime + 1)

    answer = await exchange(sandbox, code)

    assert answer["error"] == "invalid_grant"
    assert "expired" in str(answer["message"])


async def test_code_exchange_with_another_redirect_uri_fails(sandbox: Sandbox) -> None:
    code = code_from(await authorize(sandbox.client, sandbox.config, 1001))

    answer = await exchange(sandbox, code, redirect_uri=REDIRECT + "/other")

    assert answer["error"] == "invalid_grant"
    assert answer["status"] == "BAD_REDIRECT_URI"


async def test_wrong_client_secret_is_invalid_client(sandbox: Sandbox) -> None:
    code = code_from(await authorize(sandbox.client, sandbox.config, 1001))

    answer = await exchange(sandbox, code, client_secret="wrong")

    assert answer["error"] == "invalid_client"


async def test_client_credentials_in_basic_auth_only_are_rejected(sandbox: Sandbox) -> None:
    code = code_from(await authorize(sandbox.client, sandbox.config, 1001))
    response = await sandbox.client.post(
        "/oauth/v3/token",
        data={"grant_type": "authorization_code", "redirect_uri": REDIRECT, "code": code},
        auth=(sandbox.config.client_id, sandbox.config.client_secret),
    )

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_client"


async def test_pkce_s256_is_enforced(sandbox: Sandbox) -> None:
    verifier, challenge = pkce_pair()
    code = code_from(
        await authorize(sandbox.client, sandbox.config, 1001, code_challenge=challenge)
    )

    missing = await exchange(sandbox, code)
    wrong = await exchange(sandbox, code, code_verifier=pkce_pair()[0])
    right = await exchange(sandbox, code, code_verifier=verifier)

    assert missing["error"] == "invalid_grant"
    assert wrong["error"] == "invalid_grant"
    assert right["http"] == 200


@pytest.mark.parametrize("version", ["v1", "v3", "2026-03"])
async def test_every_token_endpoint_version_refreshes(sandbox: Sandbox, version: str) -> None:
    tokens = await sandbox.install(1001)
    response = await sandbox.client.post(
        f"/oauth/{version}/token",
        data={
            "grant_type": "refresh_token",
            "client_id": sandbox.config.client_id,
            "client_secret": sandbox.config.client_secret,
            "refresh_token": tokens["refresh_token"],
        },
    )

    assert response.status_code == 200
    assert response.json()["access_token"] != tokens["access_token"]
    assert sandbox.state.refresh_count[1001] == 1


async def test_refresh_keeps_the_refresh_token_unless_rotation_is_on(sandbox: Sandbox) -> None:
    tokens = await sandbox.install(1001)
    kept = await refresh(sandbox, tokens["refresh_token"])
    sandbox.config.rotate_refresh_tokens = True
    rotated = await refresh(sandbox, tokens["refresh_token"])
    old_again = await refresh(sandbox, tokens["refresh_token"])

    assert kept["refresh_token"] == tokens["refresh_token"]
    assert rotated["refresh_token"] != tokens["refresh_token"]
    assert old_again["error"] == "invalid_grant"
    assert (await refresh(sandbox, str(rotated["refresh_token"])))["http"] == 200


async def test_revoked_refresh_token_answers_bad_refresh_token(sandbox: Sandbox) -> None:
    tokens = await sandbox.install(1001)
    revoked = await sandbox.client.post(
        "/oauth/v3/token/revoke",
        data={
            "client_id": sandbox.config.client_id,
            "client_secret": sandbox.config.client_secret,
            "token": tokens["refresh_token"],
            "token_type_hint": "refresh_token",
        },
    )

    answer = await refresh(sandbox, tokens["refresh_token"])

    assert revoked.status_code == 200
    assert answer["status"] == "BAD_REFRESH_TOKEN"
    assert answer["error"] == "invalid_grant"
    assert answer["message"]
    assert answer["error_description"]
    assert sandbox.state.portal(1001).installed, "revoking does not uninstall"


async def test_unknown_refresh_token_answers_invalid_grant(sandbox: Sandbox) -> None:
    answer = await refresh(sandbox, "na1-not-a-token")

    assert answer["error"] == "invalid_grant"
    assert answer["status"] == "BAD_REFRESH_TOKEN"


async def test_access_token_expires_with_expired_authentication(
    sandbox: Sandbox, clock: ManualClock
) -> None:
    headers = await sandbox.token(1001)
    before = await sandbox.client.get("/crm/v3/objects/contacts", headers=headers)
    clock.advance(1800 + 5 * 60)

    after = await sandbox.client.get("/crm/v3/objects/contacts", headers=headers)

    assert before.status_code == 200
    assert after.status_code == 401
    body = after.json()
    assert body["category"] == "EXPIRED_AUTHENTICATION"
    assert body["status"] == "error"
    assert "expired 5 minute(s) ago" in body["message"]
    assert body["correlationId"]


async def test_unknown_or_missing_token_is_invalid_authentication(sandbox: Sandbox) -> None:
    unknown = await sandbox.client.get("/crm/v3/objects/contacts", headers=bearer("CNnope"))
    missing = await sandbox.client.get("/crm/v3/objects/contacts")

    assert unknown.status_code == missing.status_code == 401
    assert unknown.json()["category"] == missing.json()["category"] == "INVALID_AUTHENTICATION"


async def test_force_expire_endpoint_expires_a_portals_tokens(sandbox: Sandbox) -> None:
    headers = await sandbox.token(1001)
    other = await sandbox.token(1002)

    response = await sandbox.client.post("/_sandbox/portals/1001/expire-tokens")

    assert response.json() == {"expired": 1}
    expired = await sandbox.client.get("/crm/v3/objects/contacts", headers=headers)
    assert expired.json()["category"] == "EXPIRED_AUTHENTICATION"
    assert (await sandbox.client.get("/crm/v3/objects/contacts", headers=other)).status_code == 200


async def test_introspect_describes_live_tokens_and_not_unknown_ones(sandbox: Sandbox) -> None:
    tokens = await sandbox.install(1001)
    form = {"client_id": sandbox.config.client_id, "client_secret": sandbox.config.client_secret}

    live = await sandbox.client.post(
        "/oauth/v3/token/introspect", data={**form, "token": tokens["access_token"]}
    )
    unknown = await sandbox.client.post("/oauth/v3/token/introspect", data={**form, "token": "x"})

    assert live.json()["active"] is True
    assert live.json()["hub_id"] == 1001
    assert live.json()["hub_domain"] == "acme-dental.sandbox.hubspot.test"
    assert live.json()["app_id"] == sandbox.config.app_id
    assert unknown.json() == {"active": False}


async def test_external_install_delete_uninstalls_and_revokes(sandbox: Sandbox) -> None:
    tokens = await sandbox.install(1001)
    headers = bearer(tokens["access_token"])

    response = await sandbox.client.delete("/appinstalls/v3/external-install", headers=headers)

    assert response.status_code == 204
    assert not sandbox.state.portal(1001).installed
    after = await sandbox.client.get("/crm/v3/objects/contacts", headers=headers)
    assert after.status_code == 401
    assert (await refresh(sandbox, tokens["refresh_token"]))["error"] == "invalid_grant"
    assert [e.action for e in sandbox.state.journal] == ["APP_INSTALL", "APP_UNINSTALL"]


async def test_legacy_token_lookup_keeps_the_token_out_of_the_traffic_log(sandbox: Sandbox) -> None:
    tokens = await sandbox.install(1001)

    response = await sandbox.client.get(f"/oauth/v1/access-tokens/{tokens['access_token']}")

    assert response.json()["hub_id"] == 1001
    assert response.json()["token_type"] == "access"
    logged = [r.path for r in sandbox.state.request_log]
    assert "/oauth/v1/access-tokens/[redacted]" in logged
    assert not any(tokens["access_token"] in p for p in logged)


async def test_client_credentials_grant_issues_an_app_token(sandbox: Sandbox) -> None:
    response = await sandbox.client.post(
        "/oauth/v1/token",
        data={
            "grant_type": "client_credentials",
            "client_id": sandbox.config.client_id,
            "client_secret": sandbox.config.client_secret,
            "scope": "developer.webhooks_journal.read",
        },
    )

    body = response.json()
    assert response.status_code == 200
    assert body["scopes"] == ["developer.webhooks_journal.read"]
    assert "refresh_token" not in body
    contacts = await sandbox.client.get(
        "/crm/v3/objects/contacts", headers=bearer(body["access_token"])
    )
    assert contacts.status_code == 401, "an app token is not a portal token"
