"""Real headless Chromium (Debian's package) for browser tests, and `hubline dev` as a process."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path(os.environ.get("HUBLINE_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    # A page a test opened first is in the background once it opens another: Chromium
    # then slows its timers and lowers its renderer's priority, and on a busy machine the
    # console's refresh timer could miss the test's wait.
    "--disable-background-timer-throttling",
    "--disable-backgrounding-occluded-windows",
    "--disable-renderer-backgrounding",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def chromium() -> Iterator[Any]:
    """A Playwright browser on Debian's chromium (never Playwright's own download)."""
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.fail(
            "Debian's chromium is missing: scripts/test installs it (apt-get install chromium)"
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class DevServer:
    """`hubline dev` running in a child process."""

    hubline_url: str
    sandbox_url: str
    dev_values: dict[str, str]
    process: subprocess.Popen[str]
    output: list[str]


@contextmanager
def hubline_dev(
    workdir: Path, *extra_args: str, env: dict[str, str] | None = None
) -> Iterator[DevServer]:
    """Start `hubline dev` in `workdir` the way a newcomer would, and stop it afterwards.

    `env` adds settings (SECRET_ROTATION_GRACE_HOURS, say) to its environment.
    """
    port, sandbox_port = free_port(), free_port()
    environment = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HUBSPOT_", "TOKEN_", "DATABASE_URL", "ADMIN_"))
    }
    environment.update({"PYTHONPATH": str(ROOT), "JOURNAL_POLL_SECONDS": "1", **(env or {})})
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app",
            "dev",
            "--port",
            str(port),
            "--sandbox-port",
            str(sandbox_port),
            *extra_args,
        ],
        cwd=workdir,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server = DevServer(
        f"http://127.0.0.1:{port}", f"http://127.0.0.1:{sandbox_port}", {}, process, []
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"hubline dev exited early: {server.output}"
            assert time.monotonic() < deadline, "hubline dev did not start in time"
            try:
                if httpx.get(f"{server.hubline_url}/readyz", timeout=1).status_code == 200:
                    httpx.get(f"{server.sandbox_url}/", timeout=1)
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        for line in (workdir / ".hubline-dev.env").read_text().splitlines():
            name, sep, value = line.partition("=")
            if sep and not name.startswith("#"):
                server.dev_values[name] = " ".join(shlex.split(value))  # written shell-quoted
        yield server
    finally:
        process.terminate()
        try:
            out, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            out, _ = process.communicate()
        server.output.extend(out.splitlines())
