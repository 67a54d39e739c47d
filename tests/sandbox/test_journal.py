"""The webhooks journal: lifecycle entries read with an app token from short-lived URLs."""

from __future__ import annotations

from urllib.parse import urlsplit

from app.sandbox import ManualClock
from tests.sandbox.conftest import Sandbox, bearer

JOURNAL = "/webhooks-journal/journal/2026-03"


async def app_token(sandbox: Sandbox) -> dict[str, str]:
    response = await sandbox.client.post(
        "/oauth/v3/token",
        data={
            "grant_type": "client_credentials",
            "client_id": sandbox.config.client_id,
            "client_secret": sandbox.config.client_secret,
            "scope": "developer.webhooks_journal.read",
        },
    )
    return bearer(response.json()["access_token"])


async def download(sandbox: Sandbox, url: str) -> dict[str, object]:
    assert url.startswith(sandbox.config.public_url)
    response = await sandbox.client.get(urlsplit(url).path)  # no Authorization header
    assert response.status_code == 200, response.text
    entry: dict[str, object] = response.json()
    return entry


async def test_ui_uninstall_revokes_tokens_and_journals_the_uninstall(sandbox: Sandbox) -> None:
    tokens = await sandbox.install(1001)
    headers = await app_token(sandbox)

    clicked = await sandbox.client.post("/portals/1001/uninstall")
    first = await sandbox.client.get(f"{JOURNAL}/earliest", headers=headers)
    second = await sandbox.client.get(
        f"{JOURNAL}/offset/{first.json()['currentOffset']}/next", headers=headers
    )
    third = await sandbox.client.get(
        f"{JOURNAL}/offset/{second.json()['currentOffset']}/next", headers=headers
    )

    assert clicked.status_code == 303
    api = await sandbox.client.get(
        "/crm/v3/objects/contacts", headers=bearer(tokens["access_token"])
    )
    assert api.status_code == 401
    install = await download(sandbox, first.json()["url"])
    uninstall = await download(sandbox, second.json()["url"])
    assert install["action"] == "APP_INSTALL"
    assert install["eventTypeId"] == "4-1909196"
    assert uninstall["action"] == "APP_UNINSTALL"
    assert uninstall["eventTypeId"] == "4-1916193"
    assert uninstall["portalId"] == 1001
    assert uninstall["subscriptionType"] == "APP_LIFECYCLE_EVENT"
    assert uninstall["occurredAt"] == int(sandbox.clock.now * 1000)
    assert second.json()["expiresAt"]
    assert third.status_code == 204, "no entry after the last one"


async def test_an_empty_journal_answers_204(sandbox: Sandbox) -> None:
    response = await sandbox.client.get(f"{JOURNAL}/earliest", headers=await app_token(sandbox))

    assert response.status_code == 204


async def test_unknown_offset_is_404(sandbox: Sandbox) -> None:
    headers = await app_token(sandbox)

    response = await sandbox.client.get(f"{JOURNAL}/offset/not-an-offset/next", headers=headers)

    assert response.status_code == 404


async def test_journal_needs_an_app_token(sandbox: Sandbox) -> None:
    portal_headers = await sandbox.token(1001)

    with_portal_token = await sandbox.client.get(f"{JOURNAL}/earliest", headers=portal_headers)
    without_token = await sandbox.client.get(f"{JOURNAL}/earliest")

    assert with_portal_token.status_code == 403
    assert with_portal_token.json()["category"] == "MISSING_SCOPES"
    assert without_token.status_code == 401


async def test_download_urls_expire(sandbox: Sandbox, clock: ManualClock) -> None:
    await sandbox.install(1001)
    answer = await sandbox.client.get(f"{JOURNAL}/earliest", headers=await app_token(sandbox))
    clock.advance(sandbox.config.journal_url_lifetime + 1)

    response = await sandbox.client.get(urlsplit(answer.json()["url"]).path)

    assert response.status_code == 403


async def test_entries_are_kept_three_days(sandbox: Sandbox, clock: ManualClock) -> None:
    await sandbox.install(1001)
    clock.advance(3 * 24 * 3600 + 1)
    await sandbox.install(1002)
    headers = await app_token(sandbox)

    answer = await sandbox.client.get(f"{JOURNAL}/earliest", headers=headers)

    assert (await download(sandbox, answer.json()["url"]))["portalId"] == 1002


async def test_reinstall_after_uninstall_journals_again_and_filters_by_portal(
    sandbox: Sandbox,
) -> None:
    await sandbox.install(1001)
    await sandbox.install(1002)
    await sandbox.client.post("/_sandbox/portals/1001/uninstall")
    await sandbox.install(1001)
    headers = await app_token(sandbox)

    batch = await sandbox.client.get(
        "/webhooks-journal/journal-local/2026-03/batch/earliest/10",
        params={"installPortalId": 1001},
        headers=headers,
    )

    assert batch.json()["status"] == "COMPLETE"
    actions = [(await download(sandbox, r["url"]))["action"] for r in batch.json()["results"]]
    assert actions == ["APP_INSTALL", "APP_UNINSTALL", "APP_INSTALL"]
