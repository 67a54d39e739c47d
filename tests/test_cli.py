"""The command line and `hubline serve` as an operator meets them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from app import cli, db
from app.crypto import generate_key, parse_keys
from app.main import close_services, open_services
from app.settings import load_settings
from tests.conftest import TEST_CLIENT_ID, TEST_CLIENT_SECRET, TEST_KEY
from tests.support_hubline import until_waiting_on_locks
from tests.webhook_support import add_portal

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


def app_env(**extra: str) -> dict[str, str]:
    """`clean_env` with what every Hubline process needs: the app's credentials and key."""
    return clean_env(
        HUBSPOT_CLIENT_ID=TEST_CLIENT_ID,
        HUBSPOT_CLIENT_SECRET=TEST_CLIENT_SECRET,
        TOKEN_ENCRYPTION_KEYS=TEST_KEY,
        **extra,
    )


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


async def test_serve_with_keys_that_cannot_read_what_is_stored_refuses_with_one_line(
    tmp_path: Path,
) -> None:
    env = app_env(DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'hubline.db'}")
    resources = await open_services(load_settings(env, env_file=None))
    try:
        await add_portal(resources.sessions, resources.cipher, 1001)
    finally:
        await close_services(resources)
    env["TOKEN_ENCRYPTION_KEYS"] = generate_key()  # the old key left out
    # README: exit 3 is stored secrets the configured keys cannot read, for every command.
    result = hubline("serve", "--port", str(free_port()), env=env, cwd=tmp_path)
    assert result.returncode == 3
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "cannot read stored secrets" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    # A command that writes refuses too, before storing anything the deployment's keys
    # could not read: here a secret made by a key that predates a rotation.
    rotated = hubline("portals", "rotate-secret", "1001", env=env, cwd=tmp_path)
    assert rotated.returncode == 3
    assert "cannot read stored secrets" in rotated.stderr
    env["TOKEN_ENCRYPTION_KEYS"] = TEST_KEY
    resources = await open_services(load_settings(env, env_file=None))  # still all readable
    await close_services(resources)


@pytest.mark.slow
async def test_serve_on_a_fresh_directory_answers_health_and_readiness(tmp_path: Path) -> None:
    port = free_port()
    env = app_env(JOURNAL_POLL_SECONDS="0")
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


@pytest.mark.slow
@pytest.mark.parametrize("command", ["serve", "worker"])
async def test_a_stop_that_outlasts_shutdown_timeout_ends_the_process_saying_why(
    tmp_path: Path, command: str
) -> None:
    """A database that stops answering holds a graceful stop open (here another process
    holds SQLite's write lock, for up to its 30 s busy timeout; a frozen PostgreSQL server
    holds it for as long as TCP does): past SHUTDOWN_TIMEOUT_SECONDS the process ends."""
    port = free_port()
    env = app_env(JOURNAL_POLL_SECONDS="0", SHUTDOWN_TIMEOUT_SECONDS="2")
    args = ["serve", "--port", str(port), "--no-worker"] if command == "serve" else ["worker"]
    log_path = tmp_path / "process.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", *args],
            env=env,
            cwd=tmp_path,
            stdout=log_file,
            stderr=log_file,
        )
    holder: sqlite3.Connection | None = None
    try:
        deadline = time.monotonic() + 30
        ready = b"Application startup complete" if command == "serve" else b"worker started"
        while ready not in log_path.read_bytes():
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "never started"
            await asyncio.sleep(0.1)
        holder = sqlite3.connect(tmp_path / "hubline.db", isolation_level=None, timeout=10)
        holder.execute("BEGIN IMMEDIATE")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            # A webhook whose portal lookup waits for the lock (the worker's claim does).
            waiting = (
                asyncio.ensure_future(http.post("/webhooks/portals/1001/receptionist", json={}))
                if command == "serve"
                else None
            )
            await asyncio.sleep(1.5)
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            while process.poll() is None and time.monotonic() - signalled < 20:
                await asyncio.sleep(0.1)
            stopped_after = time.monotonic() - signalled
            if waiting is not None:
                waiting.cancel()
                with contextlib.suppress(BaseException):
                    await waiting
        assert process.poll() == 1, log_path.read_text()
        assert stopped_after < 10
        assert "still stopping after 2 s (SHUTDOWN_TIMEOUT_SECONDS)" in log_path.read_text()
    finally:
        if holder is not None:
            holder.execute("ROLLBACK")
            holder.close()
        if process.poll() is None:
            process.kill()
            process.wait()


def test_migrate_creates_the_schema_then_reports_it_is_current(tmp_path: Path) -> None:
    # DATABASE_URL alone: a deploy's migration job need not be given the app's secrets.
    env = clean_env(DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}")
    first = hubline("migrate", env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("migrated schema from empty to")
    again = hubline("migrate", env=env, cwd=tmp_path)
    assert again.stdout.startswith("schema already at")
    wrong = hubline("migrate", env=clean_env(DATABASE_URL="mysql://db/hubline"), cwd=tmp_path)
    assert (wrong.returncode, wrong.stderr.strip()) == (
        2,
        "hubline: DATABASE_URL is invalid: must be a sqlite+aiosqlite:// or "
        "postgresql+asyncpg:// URL",
    )


@pytest.mark.parametrize("empty_database_url", ["postgres"], indirect=True)
async def test_deploys_migrating_one_new_database_at_once_all_succeed(
    empty_database_url: str, tmp_path: Path
) -> None:
    # Every web container of the image runs `hubline migrate` as it starts: on a new
    # database they race to create the same tables, and each must succeed. To make them
    # meet, the test holds the first table every migration creates, uncreated, until all
    # four are waiting, then lets them go at once.
    engine = db.create_engine(empty_database_url, poolclass=sa.NullPool)
    try:
        async with engine.connect() as holder:
            transaction = await holder.begin()
            await holder.execute(sa.text("CREATE TABLE alembic_version (version_num text)"))
            processes = [
                subprocess.Popen(
                    [sys.executable, "-m", "app", "migrate"],
                    env=_database_env(empty_database_url),
                    cwd=tmp_path,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for _ in range(4)
            ]
            assert await until_waiting_on_locks(engine, 4) == 4
            await transaction.rollback()
        outputs = [
            await asyncio.to_thread(process.communicate, timeout=60) for process in processes
        ]
    finally:
        await engine.dispose()
    assert [process.returncode for process in processes] == [0] * 4, outputs
    said = sorted(out.split(" ")[0] for out, _ in outputs)
    assert said == ["migrated", "schema", "schema", "schema"], outputs


@pytest.mark.parametrize("empty_database_url", ["postgres"], indirect=True)
async def test_migrate_waits_for_a_database_that_comes_up_after_it(
    empty_database_url: str, tmp_path: Path
) -> None:
    # A deploy may start PostgreSQL and the web container together. Here the database
    # comes up late: on a port nothing listens on until a relay to the real server opens.
    real = make_url(empty_database_url)
    port = free_port()
    late = real.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "app", "migrate", "--wait", "60"),
        env=_database_env(late),
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    said = (await asyncio.wait_for(process.stderr.readline(), timeout=30)).decode()
    assert said.rstrip().endswith("waiting up to 60 s"), said

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(real.host, real.port)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while chunk := await source.read(65536):
                    sink.write(chunk)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    server = await asyncio.start_server(relay, "127.0.0.1", port)
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        server.close()
    assert process.returncode == 0, err.decode()
    assert out.decode().startswith("migrated schema from empty to"), out


def test_migrate_waits_no_longer_than_told_nor_for_a_database_that_refuses_it(
    tmp_path: Path,
) -> None:
    nothing_listens = f"postgresql+asyncpg://hubline:do-not-show-me@127.0.0.1:{free_port()}/h"
    started = time.monotonic()
    result = hubline("migrate", "--wait", "1.5", env=_database_env(nothing_listens), cwd=tmp_path)
    assert time.monotonic() - started >= 1.5
    assert result.returncode == 1, result.stderr
    waiting, gave_up = result.stderr.splitlines()
    assert waiting.startswith("hubline: the database at postgresql+asyncpg://hubline:***@")
    assert waiting.endswith("is not up yet ([Errno 111] Connection refused): waiting up to 1.5 s")
    assert gave_up.startswith("hubline: cannot reach the database at ")
    assert "do-not-show-me" not in result.stdout + result.stderr
    for wrong in ("-1", "nan", "3601", "soon"):
        refused = hubline(
            "migrate", "--wait", wrong, env=_database_env(nothing_listens), cwd=tmp_path
        )
        assert refused.returncode == 2
        assert f"argument --wait: {wrong!r} is not a number of seconds" in refused.stderr


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_migrate_does_not_wait_for_a_database_that_refuses_it(
    database_url: str, tmp_path: Path
) -> None:
    # Waiting cannot create a database that is not there or fix a password.
    missing = make_url(database_url).set(database="no_such_database_here")
    url = missing.render_as_string(hide_password=False)
    started = time.monotonic()
    result = hubline("migrate", "--wait", "60", env=_database_env(url), cwd=tmp_path)
    assert time.monotonic() - started < 30
    line = _one_line_error(result)
    assert line.endswith('database "no_such_database_here" does not exist'), line


def _database_env(database_url: str) -> dict[str, str]:
    return app_env(DATABASE_URL=database_url)


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr.strip()


def test_commands_say_in_one_line_that_the_database_cannot_be_reached(tmp_path: Path) -> None:
    url = f"postgresql+asyncpg://hubline:do-not-show-me@127.0.0.1:{free_port()}/hubline"
    env = _database_env(url)
    for command in (["portals", "list"], ["events", "list"], ["keys", "rotate"], ["migrate"]):
        result = hubline(*command, env=env, cwd=tmp_path)
        line = _one_line_error(result)
        assert line.startswith("hubline: cannot reach the database at "), command
        assert "postgresql+asyncpg://hubline:***@127.0.0.1:" in line
        assert "do-not-show-me" not in result.stdout + result.stderr
    # A password can ride in the query too (the driver takes its arguments from it).
    env = _database_env(f"postgresql+asyncpg://hubline@127.0.0.1:{free_port()}/h?password=pw-in-q")
    result = hubline("portals", "list", env=env, cwd=tmp_path)
    assert "cannot reach the database at postgresql+asyncpg://hubline@127.0.0.1:" in (
        _one_line_error(result)
    )
    assert "pw-in-q" not in result.stdout + result.stderr


def test_commands_on_a_database_without_the_schema_say_to_migrate(tmp_path: Path) -> None:
    (tmp_path / "hubline.db").touch()  # an empty file is an empty SQLite database
    env = _database_env(f"sqlite+aiosqlite:///{tmp_path / 'hubline.db'}")
    for command in (["portals", "list"], ["events", "retry", "--failed"]):
        line = _one_line_error(hubline(*command, env=env, cwd=tmp_path))
        assert "has no Hubline schema" in line, command
        assert line.endswith("run `hubline migrate`")
    assert hubline("migrate", env=env, cwd=tmp_path).returncode == 0
    listed = hubline("portals", "list", env=env, cwd=tmp_path)
    assert listed.returncode == 0
    assert listed.stdout.strip() == "no portals installed yet"


def test_a_sqlite_file_of_something_else_is_not_filled_with_hublines_tables(
    tmp_path: Path,
) -> None:
    # DATABASE_URL pointing at the wrong file: `portals disconnect` (through the start-up
    # that migrates a new SQLite database) created twelve tables beside `customers`.
    other = tmp_path / "shop.db"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY)")
    env = _database_env(f"sqlite+aiosqlite:///{other}")
    for command in (["portals", "disconnect", "5"], ["portals", "list"]):
        line = _one_line_error(hubline(*command, env=env, cwd=tmp_path))
        assert "has no Hubline schema" in line, command
    with sqlite3.connect(other) as connection:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master")]
    assert tables == ["customers"]


def test_a_sqlite_database_in_a_missing_folder_is_named_and_migrate_makes_it(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "data"
    env = _database_env(f"sqlite+aiosqlite:///{folder / 'hubline.db'}")
    line = _one_line_error(hubline("events", "list", env=env, cwd=tmp_path))
    assert f"there is no folder {folder} " in line
    migrated = hubline("migrate", env=env, cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    assert (folder / "hubline.db").exists()


def test_commands_on_a_sqlite_file_that_is_not_there_say_so_and_create_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "hubline-typo.db"
    env = _database_env(f"sqlite+aiosqlite:///{path}")
    commands = (
        ["portals", "list"],
        ["portals", "show", "1001"],
        ["portals", "rotate-secret", "1001"],
        ["portals", "disconnect", "1001"],
        ["events", "list"],
        ["events", "retry", "--failed"],
        ["keys", "rotate"],
    )
    for command in commands:
        result = hubline(*command, env=env, cwd=tmp_path)
        assert result.returncode == 1, command
        line = _one_line_error(result)
        assert line == (
            f"hubline: there is no database at sqlite+aiosqlite:///{path}: check DATABASE_URL, "
            "or run `hubline migrate` to create one"
        ), command
    assert sorted(tmp_path.iterdir()) == []
    migrated = hubline("migrate", env=env, cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    assert hubline("portals", "list", env=env, cwd=tmp_path).stdout.strip() == (
        "no portals installed yet"
    )


def test_a_port_out_of_range_is_a_usage_error_not_another_port(tmp_path: Path) -> None:
    # uvicorn bound 112986 as 47450 (the number modulo 65536) and logged 112986.
    for command in (["serve", "--port", "112986"], ["dev", "--sandbox-port", "-1"]):
        result = hubline(*command, env=clean_env(), cwd=tmp_path)
        assert result.returncode == 2, command
        assert "is not a port (0 to 65535)" in result.stderr, command


def test_a_busy_port_is_one_line_and_exit_1_before_anything_starts(tmp_path: Path) -> None:
    # uvicorn found the port busy only after the app and its worker had started, logged
    # its own lines, and exited 3 (which the README keeps for unreadable secrets).
    env = app_env(DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'hubline.db'}")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for command in (["serve", "--port", port], ["sandbox", "--port", port]):
            result = hubline(*command, env=env, cwd=tmp_path)
            assert result.returncode == 1, (command, result.stderr)
            assert result.stderr.strip() == (
                f"hubline {command[0]}: could not start: port {port} is already in use "
                "(choose another with --port)"
            )
            assert result.stdout == ""


def test_an_unknown_log_level_is_a_usage_error(tmp_path: Path) -> None:
    for command in ("serve", "worker", "dev", "sandbox"):
        result = hubline(command, "--log-level", "chatty", env=clean_env(), cwd=tmp_path)
        assert result.returncode == 2, command
        assert "argument --log-level: invalid choice: 'chatty'" in result.stderr, command


def run_sqlite(path: Path, *statements: str) -> None:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        for statement in statements:
            connection.execute(statement)
        connection.commit()


def test_migrate_leaves_a_newer_schema_alone_and_says_a_refused_migration_in_one_line(
    tmp_path: Path,
) -> None:
    # An older image (a rollback, the old half of a rolling deploy) runs `hubline migrate`
    # before `serve`: on a schema a newer Hubline made, it failed with a traceback, and the
    # container never started, though the older code serves that schema.
    path = tmp_path / "hubline.db"
    env = clean_env(DATABASE_URL=f"sqlite+aiosqlite:///{path}")
    assert hubline("migrate", env=env, cwd=tmp_path).returncode == 0
    run_sqlite(path, "UPDATE alembic_version SET version_num = '0099'")
    ahead = hubline("migrate", env=env, cwd=tmp_path)
    assert (ahead.returncode, ahead.stderr) == (0, "")
    assert ahead.stdout.startswith("schema at 0099, newer than this Hubline's ")
    assert ahead.stdout.rstrip().endswith(": nothing to do")

    # A revision this code lacks in a database without Hubline's tables is no newer
    # Hubline's: another application's database, or a wrong DATABASE_URL.
    stranger = tmp_path / "stranger.db"
    run_sqlite(
        stranger,
        "CREATE TABLE alembic_version (version_num VARCHAR(32))",
        "INSERT INTO alembic_version VALUES ('ae1027a6acf')",
        "CREATE TABLE users (id INTEGER)",
    )
    foreign = hubline(
        "migrate", env=clean_env(DATABASE_URL=f"sqlite+aiosqlite:///{stranger}"), cwd=tmp_path
    )
    assert foreign.returncode == 1
    assert foreign.stderr.strip() == (
        "hubline: the migration failed and changed nothing: the database is at revision "
        "ae1027a6acf, which is not Hubline's, and lacks Hubline's tables: check DATABASE_URL"
    )
    # Two revisions at once (branches Hubline never makes): one line too.
    run_sqlite(path, "INSERT INTO alembic_version VALUES ('0004')")
    branched = hubline("migrate", env=env, cwd=tmp_path)
    assert branched.returncode == 1
    assert branched.stderr.startswith("hubline: the migration failed and changed nothing: ")
    assert branched.stderr.count("\n") == 1, branched.stderr

    # A migration the database refuses: one line, exit 1, nothing changed.
    clash = tmp_path / "clash.db"
    run_sqlite(clash, "CREATE TABLE events (x INTEGER)")
    refused = hubline(
        "migrate", env=clean_env(DATABASE_URL=f"sqlite+aiosqlite:///{clash}"), cwd=tmp_path
    )
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        "hubline: the migration failed and changed nothing: table events already exists"
    )
    with contextlib.closing(sqlite3.connect(clash)) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    assert tables == {"events"}


def test_a_busy_port_is_told_from_an_address_of_another_family() -> None:
    # An IPv4 probe of "::" failed to bind and called every IPv6 port busy.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert not cli.port_is_free("127.0.0.1", taken.getsockname()[1])
    try:
        listening = socket.socket(socket.AF_INET6)
        listening.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with listening:
        listening.listen()
        port = listening.getsockname()[1]
        assert not cli.port_is_free("::1", port)
        assert cli.port_is_free("::1", free_port())
