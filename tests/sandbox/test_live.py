"""The sandbox over real HTTP: `serve_sandbox`, and a real headless Chromium driving its pages."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
import uvicorn

from app.sandbox import SandboxConfig, SandboxState, create_sandbox_app, serve_sandbox
from tests.browser import chromium, free_port


async def test_serve_sandbox_serves_until_cancelled() -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    task = asyncio.create_task(
        serve_sandbox(SandboxConfig(public_url=base), host="127.0.0.1", port=port)
    )
    async with httpx.AsyncClient(base_url=base) as client:
        for _ in range(200):
            with contextlib.suppress(httpx.ConnectError):
                if (await client.get("/_sandbox/state")).status_code == 200:
                    break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the sandbox never answered")

        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        with pytest.raises(httpx.ConnectError):
            await client.get("/_sandbox/state")


@dataclass
class LiveSandbox:
    """A sandbox served by uvicorn in a thread; its state stays inspectable in-process."""

    base_url: str
    state: SandboxState


@pytest.fixture
def live_sandbox() -> Iterator[LiveSandbox]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    app = create_sandbox_app(SandboxConfig(public_url=base_url))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", ws="none"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield LiveSandbox(base_url, app.state.sandbox)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.mark.browser
def test_browser_install_then_ui_shows_api_data_and_edits_deletes_uninstalls(
    live_sandbox: LiveSandbox,
) -> None:
    from playwright.sync_api import expect

    base = live_sandbox.base_url
    config = live_sandbox.state.config
    redirect_uri = f"{base}/callback-probe"
    authorize_url = f"{base}/oauth/authorize?" + urlencode(
        {
            "client_id": config.client_id,
            "redirect_uri": redirect_uri,
            "scope": "oauth crm.objects.contacts.read crm.objects.contacts.write",
            "state": "browser-state",
        }
    )

    with chromium() as browser:
        page = browser.new_page()
        page.set_default_timeout(10_000)

        # Install: approve portal 1001 and land on the redirect URI with a code.
        page.goto(authorize_url)
        page.get_by_test_id("approve-1001").click()
        page.wait_for_url(f"{redirect_uri}?*")
        query = parse_qs(urlsplit(page.url).query)
        assert query["state"] == ["browser-state"]

        with httpx.Client(base_url=base) as api:
            token = api.post(
                "/oauth/v3/token",
                data={
                    "grant_type": "authorization_code",
                    "client_id": config.client_id,
                    "client_secret": config.client_secret,
                    "redirect_uri": redirect_uri,
                    "code": query["code"][0],
                },
            )
            assert token.status_code == 200, token.text
            headers = {"Authorization": f"Bearer {token.json()['access_token']}"}

            def create(object_type: str, body: dict[str, object]) -> str:
                response = api.post(f"/crm/v3/objects/{object_type}", json=body, headers=headers)
                assert response.status_code == 201, response.text
                object_id: str = response.json()["id"]
                return object_id

            ada = create(
                "contacts",
                {
                    "properties": {
                        "firstname": "Ada",
                        "email": "ada@example.com",
                        "phone": "(415) 555-0100",
                    }
                },
            )
            bob = create(
                "contacts", {"properties": {"firstname": "Bob", "email": "bob@example.com"}}
            )

            def linked(type_id: int) -> list[dict[str, object]]:
                return [
                    {
                        "to": {"id": ada},
                        "types": [
                            {
                                "associationCategory": "HUBSPOT_DEFINED",
                                "associationTypeId": type_id,
                            }
                        ],
                    }
                ]

            call = create(
                "calls",
                {
                    "properties": {
                        "hs_timestamp": "2026-03-02T14:30:00Z",
                        "hs_call_title": "AI receptionist call",
                        "hs_call_body": "Wants a cleaning appointment",
                    },
                    "associations": linked(194),
                },
            )
            note = create(
                "notes",
                {
                    "properties": {
                        "hs_timestamp": "2026-03-02T15:00:00Z",
                        "hs_note_body": "AI receptionist text",
                    },
                    "associations": linked(202),
                },
            )

            # The UI shows what the API created.
            page.goto(f"{base}/portals/1001")
            expect(page.get_by_test_id(f"contact-email-{ada}")).to_have_text("ada@example.com")
            expect(page.get_by_test_id(f"contact-phone-{ada}")).to_have_text("(415) 555-0100")
            expect(page.get_by_test_id("traffic-row").first).to_be_visible()
            page.get_by_test_id(f"contact-link-{ada}").click()
            expect(page.get_by_test_id(f"timeline-call-{call}")).to_contain_text(
                "Wants a cleaning appointment"
            )
            expect(page.get_by_test_id(f"timeline-note-{note}")).to_contain_text(
                "AI receptionist text"
            )

            # An edit made in the UI reaches the API.
            page.get_by_test_id("edit-lastname").fill("Lovelace")
            page.get_by_test_id("edit-submit").click()
            expect(page.get_by_test_id("property-lastname")).to_have_text("Lovelace")
            read = api.get(f"/crm/v3/objects/contacts/{ada}", headers=headers)
            assert read.json()["properties"]["lastname"] == "Lovelace"

            # A deletion made in the UI removes the contact.
            page.goto(f"{base}/portals/1001/contacts/{bob}")
            page.get_by_test_id("delete-contact").click()
            page.wait_for_url(f"{base}/portals/1001")
            expect(page.get_by_test_id(f"contact-row-{bob}")).to_have_count(0)
            gone = api.get(f"/crm/v3/objects/contacts/{bob}", headers=headers)
            assert gone.status_code == 404

            # An uninstall made in the UI revokes the app's access.
            page.get_by_test_id("uninstall-app").click()
            expect(page.get_by_test_id("install-status")).to_have_text("not installed")
            denied = api.get("/crm/v3/objects/contacts", headers=headers)
            assert denied.status_code == 401
            assert [e.action for e in live_sandbox.state.journal][-1] == "APP_UNINSTALL"
