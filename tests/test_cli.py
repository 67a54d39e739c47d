"""The command line and `hubline serve` as an operator meets them."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.crypto import parse_keys
from tests.conftest import TEST_CLIENT_ID, TEST_CLIENT_SECRET, TEST_KEY

ROOT = Path(__file__).resolve().parent.parent


def hubline(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HUBSPOT_", "TOKEN_", "DATABASE_URL"))
    }
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_keys_generate_prints_a_usable_key_on_its_last_line(tmp_path: Path) -> None:
    result = hubline("keys", "generate", env=clean_env(), cwd=tmp_path)
    assert result.returncode == 0
    key = result.stdout.strip().splitlines()[-1]
    assert len(parse_keys(key)) == 1


def test_every_command_has_help(tmp_path: Path) -> None:
    for command in (
        ["serve"],
        ["worker"],
        ["migrate"],
        ["keys", "rotate"],
        ["events", "list"],
        ["events", "retry"],
    ):
        result = hubline(*command, "--help", env=clean_env(), cwd=tmp_path)
        assert result.returncode == 0, command
        assert "usage: hubline" in result.stdout


def test_serve_without_keys_refuses_with_one_line(tmp_path: Path) -> None:
    env = clean_env(HUBSPOT_CLIENT_ID=TEST_CLIENT_ID, HUBSPOT_CLIENT_SECRET=TEST_CLIENT_SECRET)
    result = hubline("serve", "--port", str(free_port()), env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "TOKEN_ENCRYPTION_KEYS is required" in result.stderr
    assert not (tmp_path / "hubline.db").exists(), (
        "serve must not invent keys or touch the database"
    )


def test_serve_never_prints_a_secret_in_its_error(tmp_path: Path) -> None:
    env = clean_env(
        HUBSPOT_CLIENT_ID=TEST_CLIENT_ID,
        HUBSPOT_CLIENT_SECRET=TEST_CLIENT_SECRET,
        TOKEN_ENCRYPTION_KEYS="hunter2-is-not-a-key",
    )
    result = hubline("serve", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "TOKEN_ENCRYPTION_KEYS" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


@pytest.mark.slow
async def test_serve_on_a_fresh_directory_answers_health_and_readiness(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(
        HUBSPOT_CLIENT_ID=TEST_CLIENT_ID,
        HUBSPOT_CLIENT_SECRET=TEST_CLIENT_SECRET,
        TOKEN_ENCRYPTION_KEYS=TEST_KEY,
        JOURNAL_POLL_SECONDS="0",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    health = await http.get("/healthz")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "serve never answered"
                    await asyncio.sleep(0.1)
            ready = await http.get("/readyz")
        assert health.status_code == 200
        assert ready.status_code == 200
        assert ready.json()["status"] == "ok"
        assert (tmp_path / "hubline.db").exists()
    finally:
        process.terminate()
        # uvicorn shuts down gracefully, then re-raises SIGTERM as its exit status.
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)


def test_migrate_creates_the_schema_then_reports_it_is_current(tmp_path: Path) -> None:
    env = clean_env(
        HUBSPOT_CLIENT_ID=TEST_CLIENT_ID,
        HUBSPOT_CLIENT_SECRET=TEST_CLIENT_SECRET,
        TOKEN_ENCRYPTION_KEYS=TEST_KEY,
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}",
    )
    first = hubline("migrate", env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("migrated schema from empty to")
    again = hubline("migrate", env=env, cwd=tmp_path)
    assert again.stdout.startswith("schema already at")
