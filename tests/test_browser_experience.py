"""The people's paths through Hubline, in real headless Chromium against `hubline dev`.

A newcomer installs two sandbox portals by clicking and sees the demo land in HubSpot;
an operator finds a failed event in the console, retries it and sees it synced; a
portal's admin rotates the secret and watches the old one stop working after the
grace period; the copy buttons fill the clipboard and the test-event button shows the
event arrived.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from tests.browser import DevServer, chromium, hubline_dev

pytestmark = [pytest.mark.browser, pytest.mark.slow]

T = TypeVar("T")


def wait_for(check: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    """Poll `check` until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def install_in_browser(page: Any, dev: DevServer, portal_id: int) -> tuple[str, str]:
    """Landing page → Install → Approve in the sandbox → the settings page: (URL, secret)."""
    page.goto(f"{dev.hubline_url}/")
    page.get_by_test_id("install").click()
    page.get_by_test_id(f"approve-{portal_id}").click()
    page.wait_for_url(f"{dev.hubline_url}/oauth/callback?*")
    url = page.get_by_test_id("webhook-url").inner_text().strip()
    secret = page.get_by_test_id("webhook-secret").inner_text().strip()
    assert url == f"{dev.hubline_url}/webhooks/portals/{portal_id}/receptionist"
    assert secret.startswith("whsec_")
    return url, secret


def admin_api(dev: DevServer, path: str, method: str = "GET") -> Any:
    answer = httpx.request(
        method,
        f"{dev.hubline_url}/admin/api{path}",
        headers={"Authorization": f"Bearer {dev.dev_values['ADMIN_TOKEN']}"},
        timeout=10,
    )
    assert answer.is_success, answer.text
    return answer.json()


def send_signed(url: str, secret: str, event: dict[str, Any]) -> httpx.Response:
    """POST an event as a receptionist platform does: Standard Webhooks signature."""
    body = json.dumps(event)
    now = datetime.now(UTC)
    return httpx.post(
        url,
        content=body,
        headers={
            "content-type": "application/json",
            "webhook-id": event["id"],
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": Webhook(secret).sign(event["id"], now, body),
        },
        timeout=10,
    )


def a_call(event_id: str, name: str, phone: str) -> dict[str, Any]:
    return {
        "id": event_id,
        "type": "call.completed",
        "occurred_at": datetime.now(UTC).isoformat(),
        "caller": {"name": name, "phone": phone},
        "summary": "Asked about opening hours",
        "duration_seconds": 60,
        "outcome": "Question Answered",
    }


def settled(dev: DevServer, portal_id: int) -> bool:
    """The portal's queued work (provisioning, events) is all handled."""
    detail = admin_api(dev, f"/portals/{portal_id}")
    return detail["pending"] == 0 and all(
        e["status"] in ("done", "failed") for e in detail["events"]
    )


def test_a_newcomer_installs_two_portals_and_sees_the_demo_in_hubspot(tmp_path: Path) -> None:
    with hubline_dev(tmp_path, "--demo") as dev, chromium() as browser:
        page = browser.new_page()
        page.goto(f"{dev.hubline_url}/")
        assert "Manage my installation" in page.get_by_test_id("manage").inner_text()
        for portal_id in (1001, 1002):
            install_in_browser(page, dev, portal_id)
            assert page.get_by_test_id("portal-status").inner_text() == "active"

        for portal_id in (1001, 1002):
            sandbox_page = f"{dev.sandbox_url}/portals/{portal_id}"

            def five_callers(url: str = sandbox_page) -> bool:
                page.goto(url)
                return page.locator("[data-testid^='contact-row-']").count() >= 5

            def two_calls() -> bool:
                page.reload()
                return page.locator("[data-testid^='timeline-call-']").count() == 2

            wait_for(five_callers, f"the demo's five callers in portal {portal_id}", timeout=60)
            page.get_by_role("link", name="Ada Lovelace").click()
            assert page.get_by_test_id("contact-name").inner_text() == "Ada Lovelace"
            # Ada called twice (the second time with her number written another way):
            # one contact, two calls on her timeline.
            wait_for(two_calls, "Ada's two calls")
        overview = httpx.get(f"{dev.sandbox_url}/_sandbox/state", timeout=10).json()
        counts = {
            p["portal_id"]: (p["contacts"], p["calls"], p["notes"]) for p in overview["portals"]
        }
        assert counts[1001] == counts[1002] == (5, 4, 2)


def test_an_operator_retries_a_failed_event_from_the_console_and_sees_it_synced(
    tmp_path: Path,
) -> None:
    with hubline_dev(tmp_path) as dev, chromium() as browser:
        page = browser.new_page()
        url, secret = install_in_browser(page, dev, 1001)
        wait_for(lambda: settled(dev, 1001), "the install's provisioning")
        # HubSpot refuses the caller lookup once: the event fails with HubSpot's reason.
        httpx.post(
            f"{dev.sandbox_url}/_sandbox/faults",
            json={"count": 1, "status": 400, "portal_id": 1001, "path_prefix": "/crm/v3/objects/"},
            timeout=10,
        ).raise_for_status()
        assert (
            send_signed(
                url, secret, a_call("evt-console", "Ruth Bader", "+1 415 555 0166")
            ).status_code
            == 202
        )
        failed = wait_for(
            lambda: next(
                (e for e in admin_api(dev, "/portals/1001")["events"] if e["status"] == "failed"),
                None,
            ),
            "the event to fail",
        )

        page.goto(f"{dev.hubline_url}/admin")
        page.get_by_test_id("admin-token").fill(dev.dev_values["ADMIN_TOKEN"])
        page.get_by_test_id("sign-in").click()
        row = page.get_by_test_id("portal-1001")
        assert "1 failed in 24 h" in row.inner_text()
        row.get_by_role("link", name="1001").click()
        event_row = page.get_by_test_id(f"event-{failed['id']}")
        assert event_row.get_by_test_id("event-status").inner_text() == "failed"
        assert "status=400" in event_row.inner_text()
        page.get_by_test_id(f"retry-{failed['id']}").click()
        assert page.get_by_test_id("notice").inner_text() == "Queued 1 failed event(s) again."

        def synced() -> bool:
            page.goto(f"{dev.hubline_url}/admin/portals/1001")
            status = page.get_by_test_id(f"event-{failed['id']}").get_by_test_id("event-status")
            return status.inner_text() == "done"

        wait_for(synced, "the retried event to sync")
        page.get_by_test_id(f"event-{failed['id']}").get_by_role("link").click()
        page.wait_for_url(f"{dev.sandbox_url}/portals/1001/contacts/*")
        assert page.get_by_test_id("contact-name").inner_text() == "Ruth Bader"
        assert page.locator("[data-testid^='timeline-call-']").count() == 1


GRACE_HOURS = 0.001  # 3.6 seconds


def test_a_rotated_secret_stops_working_after_the_grace_period(tmp_path: Path) -> None:
    env = {"SECRET_ROTATION_GRACE_HOURS": str(GRACE_HOURS)}
    with hubline_dev(tmp_path, env=env) as dev, chromium() as browser:
        page = browser.new_page()
        url, old_secret = install_in_browser(page, dev, 1001)
        page.get_by_test_id("rotate-secret").click()
        rotated_at = time.monotonic()
        new_secret = page.get_by_test_id("webhook-secret").inner_text().strip()
        assert new_secret.startswith("whsec_")
        assert new_secret != old_secret
        assert "keeps working for 4 seconds" in page.get_by_test_id("notice").inner_text()

        assert (
            send_signed(
                url, old_secret, a_call("evt-old-1", "Old Secret", "+14155550101")
            ).status_code
            == 202
        )
        assert (
            send_signed(
                url, new_secret, a_call("evt-new-1", "New Secret", "+14155550102")
            ).status_code
            == 202
        )
        attempts = iter(range(1000))

        def old_refused() -> bool:
            event = a_call(f"evt-old-late-{next(attempts)}", "Old Secret", "+14155550101")
            return send_signed(url, old_secret, event).status_code == 401

        wait_for(old_refused, "the old secret to stop working", timeout=20)
        assert time.monotonic() - rotated_at >= GRACE_HOURS * 3600 - 1.0
        assert (
            send_signed(
                url, new_secret, a_call("evt-new-2", "New Secret", "+14155550102")
            ).status_code
            == 202
        )
        page.goto(f"{dev.hubline_url}/settings")
        assert page.get_by_test_id("webhook-secret").inner_text().strip() == new_secret


def test_copy_buttons_fill_the_clipboard_and_a_test_event_arrives(tmp_path: Path) -> None:
    with hubline_dev(tmp_path) as dev, chromium() as browser:
        context = browser.new_context()
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=dev.hubline_url)
        page = context.new_page()
        url, secret = install_in_browser(page, dev, 1001)
        for button, expected in (("copy-url", url), ("copy-secret", secret)):
            page.get_by_test_id(button).click()
            wait_for(
                lambda: page.get_by_test_id("copy-status").inner_text() == "Copied.", "Copied."
            )
            assert page.evaluate("navigator.clipboard.readText()") == expected
            page.evaluate("document.getElementById('copy-status').textContent = ''")

        page.get_by_test_id("send-test-event").click()
        result = page.get_by_test_id("test-event-result").inner_text()
        assert result.startswith("The test event arrived")
        pings = [e for e in admin_api(dev, "/portals/1001")["events"] if e["type"] == "test.ping"]
        assert len(pings) == 1
        assert f"(event {pings[0]['id']})" in result
        wait_for(lambda: settled(dev, 1001), "the worker to handle the test event")
        sandbox = httpx.get(f"{dev.sandbox_url}/_sandbox/portals/1001", timeout=10).json()
        assert (sandbox["contacts"], sandbox["calls"], sandbox["notes"]) == (0, 0, 0)


def test_the_console_portals_table_refreshes_itself(tmp_path: Path) -> None:
    with hubline_dev(tmp_path) as dev, chromium() as browser:
        console = browser.new_page()
        console.goto(f"{dev.hubline_url}/admin")
        console.get_by_test_id("admin-token").fill(dev.dev_values["ADMIN_TOKEN"])
        console.get_by_test_id("sign-in").click()
        console.goto(f"{dev.hubline_url}/admin?refresh=1000")
        assert console.get_by_test_id("portal-1002").count() == 0
        install_in_browser(browser.new_page(), dev, 1002)
        # No navigation on the console page: its script swaps in the fresh rows.
        console.get_by_test_id("portal-1002").wait_for(timeout=10_000)
        assert "Updated" in console.locator("#refreshed").inner_text()
