"""`hubline dev`: zero configuration, generated credentials, and an install a person can click."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse

import httpx
import pytest

from app.crypto import parse_keys
from app.dev import STACK_SETTINGS
from app.sandbox.testing import approve
from tests.browser import chromium, free_port, hubline_dev

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


def test_dev_generates_its_credentials_once_in_a_private_git_ignored_file(tmp_path: Path) -> None:
    with hubline_dev(tmp_path) as dev:
        first = dict(dev.dev_values)
        install_over_http(dev.hubline_url, 1001)
    assert set(first) >= {
        "HUBSPOT_CLIENT_ID",
        "HUBSPOT_CLIENT_SECRET",
        "TOKEN_ENCRYPTION_KEYS",
        "ADMIN_TOKEN",
    }
    assert parse_keys(first["TOKEN_ENCRYPTION_KEYS"])
    dev_file = tmp_path / ".hubline-dev.env"
    assert stat.S_IMODE(dev_file.stat().st_mode) == 0o600
    with hubline_dev(tmp_path) as again:
        generated = {name: again.dev_values[name] for name in first if name not in STACK_SETTINGS}
        assert generated == {n: v for n, v in first.items() if n not in STACK_SETTINGS}, (
            "a restart keeps the credentials and key"
        )
        # The file also says where the stack runs: other commands given it reach it.
        assert again.dev_values["PUBLIC_URL"] == again.hubline_url
        listed = subprocess.run(
            [sys.executable, "-m", "app", "portals", "list"],
            cwd=tmp_path.parent,  # from another folder too
            env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **again.dev_values},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert listed.returncode == 0, listed.stdout + listed.stderr
    for generated in (".hubline-dev.env", "hubline-dev.db"):
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", generated],
            cwd=Path(__file__).resolve().parent.parent,
            check=False,
        )
        assert ignored.returncode == 0, f"{generated} must be git-ignored"
    banner = "\n".join(again.output)
    assert "click Install" in banner
    # The new sandbox knows no install of the last run: the banner says so.
    assert "install again portal(s) 1001 from an earlier run" in banner
    assert first["HUBSPOT_CLIENT_SECRET"] not in banner


def test_a_person_approves_an_install_in_the_sandbox_and_lands_on_the_redirect_uri(
    tmp_path: Path,
) -> None:
    with hubline_dev(tmp_path) as dev, chromium() as browser:
        redirect_uri = f"{dev.hubline_url}/oauth/callback"
        query = urlencode(
            {
                "client_id": dev.dev_values["HUBSPOT_CLIENT_ID"],
                "redirect_uri": redirect_uri,
                "scope": "oauth crm.objects.contacts.read crm.objects.contacts.write",
                "state": "browser-test-state",
            }
        )
        page = browser.new_page()
        page.goto(f"{dev.sandbox_url}/oauth/authorize?{query}")
        page.get_by_test_id("approve-1002").click()
        page.wait_for_url(f"{redirect_uri}?*")
        landed = urlparse(page.url)
        params = parse_qs(landed.query)
        assert f"{landed.scheme}://{landed.netloc}{landed.path}" == redirect_uri
        assert params["state"] == ["browser-test-state"]
        assert len(params["code"][0]) >= 16


def test_dev_refuses_to_share_a_port(tmp_path: Path) -> None:
    with hubline_dev(tmp_path) as dev:
        port = dev.hubline_url.rsplit(":", 1)[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "app",
                "dev",
                "--port",
                port,
                "--sandbox-port",
                str(free_port()),
            ],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert "could not start" in result.stderr


def test_the_sandbox_alone_reads_the_dev_file_and_never_writes_it(tmp_path: Path) -> None:
    dev_file = tmp_path / "notes.env"
    dev_file.write_text("# my notes\nHUBSPOT_CLIENT_ID=mine\nHUBSPOT_APP_ID=777\n")
    settings = sandbox_settings(tmp_path, "--dev-file", str(dev_file))
    # It invented a secret, an app id, a key and an admin token, and rewrote the file.
    assert dev_file.read_text() == "# my notes\nHUBSPOT_CLIENT_ID=mine\nHUBSPOT_APP_ID=777\n"
    # It signed webhooks as app 424242 whatever the Hubline beside it was told.
    assert (settings["client_id"], settings["app_id"]) == ("mine", 777)


def test_the_sandbox_and_dev_read_the_dotenv_file_as_the_other_commands_do(
    tmp_path: Path,
) -> None:
    # `hubline serve` reads .env; the sandbox beside it did not, so a client id set there
    # met another in the sandbox and installs failed. `hubline dev` ran with settings the
    # other commands in the same folder refused.
    (tmp_path / ".env").write_text("HUBSPOT_CLIENT_ID=from-dotenv\nHUBSPOT_APP_ID=515\n")
    settings = sandbox_settings(tmp_path)
    assert (settings["client_id"], settings["app_id"]) == ("from-dotenv", 515)

    (tmp_path / ".env").write_text("DEFAULT_PHONE_REGION=XX\n")
    refused = [
        subprocess.run(
            [sys.executable, "-m", "app", *command],
            cwd=tmp_path,
            env=without_hubspot_settings(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        for command in (
            ["dev", "--port", str(free_port()), "--sandbox-port", str(free_port())],
            ["portals", "list"],
        )
    ]
    for result in refused:
        assert result.returncode == 2, result.stderr
        assert "DEFAULT_PHONE_REGION is invalid" in result.stderr


def without_hubspot_settings() -> dict[str, str]:
    """This environment without HUBSPOT_* variables, running this checkout's `app`."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith("HUBSPOT_")}
    return {**kept, "PYTHONPATH": str(ROOT)}


def sandbox_settings(folder: Path, *args: str) -> Any:
    """What `hubline sandbox`, started in `folder` with `args`, says its settings are."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "sandbox", "--port", str(port), *args],
        cwd=folder,
        env=without_hubspot_settings(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        return wait_for_json(f"http://127.0.0.1:{port}/_sandbox/settings")
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_for_json(url: str) -> Any:
    deadline = time.monotonic() + 30
    while True:
        try:
            return httpx.get(url, timeout=5).json()
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def install_over_http(hubline_url: str, portal_id: int) -> None:
    async def install() -> None:
        async with httpx.AsyncClient(base_url=hubline_url, timeout=30) as browser:
            started = await browser.get("/oauth/install")
            back = await approve(browser, started.headers["location"], portal_id)
            assert (await browser.get(back)).status_code == 200

    asyncio.run(install())
