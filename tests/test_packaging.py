"""The wheel: what `pip install .` (and the image) gets must migrate and serve on its own."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from app import db
from tests.conftest import TEST_CLIENT_ID, TEST_CLIENT_SECRET, TEST_KEY

ROOT = Path(__file__).resolve().parent.parent
# `hubline migrate` from the unpacked wheel, after checking that is what was imported.
UNPACKED_MIGRATE = """
import os, sys
import app
assert app.__file__.startswith(os.environ["PYTHONPATH"]), app.__file__
from app.cli import main
sys.exit(main(["migrate"]))
"""


def test_the_wheel_carries_its_templates_and_migrations_and_migrates_from_them(
    tmp_path: Path,
) -> None:
    # Built from what the Dockerfile copies, in a folder of its own: a build in the checkout
    # would leave build/ behind, whose stale copies later builds would pick up.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("app", "migrations"):
        shutil.copytree(
            ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("hubline-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"app/{path.relative_to(ROOT / 'app')}" for path in (ROOT / "app").rglob("*.html")
    } | {
        f"app/migrations/{path.relative_to(ROOT / 'migrations')}"
        for path in (ROOT / "migrations").rglob("*")
        if path.suffix in (".py", ".mako")
    }
    assert expected <= names, sorted(expected - names)

    # Unpacked away from the checkout, the package finds its own migrations.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("HUBSPOT_", "DATABASE_"))},
        "PYTHONPATH": str(site),
        "HUBSPOT_CLIENT_ID": TEST_CLIENT_ID,
        "HUBSPOT_CLIENT_SECRET": TEST_CLIENT_SECRET,
        "TOKEN_ENCRYPTION_KEYS": TEST_KEY,
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'installed.db'}",
    }
    migrated = subprocess.run(
        [sys.executable, "-c", UNPACKED_MIGRATE],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert migrated.returncode == 0, migrated.stderr[-2000:]
    assert migrated.stdout.strip() == f"migrated schema from empty to {db.head_revision()}"


def _dockerfile_instructions(name: str) -> list[str]:
    """The arguments of each Dockerfile instruction `name`, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [
        line.removeprefix(name + " ").strip()
        for line in text.splitlines()
        if line.startswith(name + " ")
    ]


def test_the_images_entrypoint_serves_on_port_and_its_health_check_asks_there(
    tmp_path: Path,
) -> None:
    # The image cannot be built here; its commands can be run as the image runs them.
    [entrypoint] = [json.loads(found) for found in _dockerfile_instructions("ENTRYPOINT")]
    [health_check] = [
        found.partition(" CMD ")[2] for found in _dockerfile_instructions("HEALTHCHECK")
    ]
    assert "PORT=8000" in _dockerfile_instructions("ENV")
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("HUBSPOT_", "DATABASE_"))},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PORT": str(port),
        "HUBSPOT_CLIENT_ID": TEST_CLIENT_ID,
        "HUBSPOT_CLIENT_SECRET": TEST_CLIENT_SECRET,
        "TOKEN_ENCRYPTION_KEYS": TEST_KEY,
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'image.db'}",
    }
    # As `docker run hubline --no-worker` would: arguments after the image name follow.
    log = tmp_path / "server.log"
    with log.open("wb") as output:
        server = subprocess.Popen(
            [*entrypoint, "--no-worker"], env=env, cwd=tmp_path, stdout=output, stderr=output
        )
    try:
        for _ in range(300):
            checked = subprocess.run(
                ["/bin/sh", "-c", health_check], env=env, capture_output=True, timeout=10
            )
            if checked.returncode == 0 or server.poll() is not None:
                break
            time.sleep(0.1)
        assert server.poll() is None, log.read_text()[-2000:]
        assert checked.returncode == 0, checked.stderr.decode()[-2000:]
        assert "migrated schema from empty to" in log.read_text()
        # The check asks the port in PORT, not a fixed one.
        elsewhere = subprocess.run(
            ["/bin/sh", "-c", health_check],
            env={**env, "PORT": str(_free_port())},
            capture_output=True,
            timeout=10,
        )
        assert elsewhere.returncode != 0
    finally:
        server.terminate()
        server.wait(timeout=30)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
