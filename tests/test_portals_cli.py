"""`hubline portals list|show|disconnect|rotate-secret`, run as an operator runs them."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from app.portals import accepted_secrets, current_secret
from app.sandbox.limits import Fault
from tests.support_hubline import hubline_env, served_over_tcp, wait_until

HUBLINE = "from app.cli import main; raise SystemExit(main())"


async def hubline(*args: str, database_url: str, cwd: Path, **env: str) -> tuple[int, str, str]:
    # Asynchronous, so the test's event loop keeps serving the sandbox meanwhile.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HUBLINE,
        *args,
        env=hubline_env(database_url, **env),
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def disconnect_1001(
    database_url: str, cwd: Path, sandbox_url: str, *options: str
) -> tuple[int, str, str]:
    """`hubline portals disconnect 1001`, calling HubSpot at the sandbox."""
    return await hubline(
        "portals",
        "disconnect",
        "1001",
        *options,
        database_url=database_url,
        cwd=cwd,
        HUBSPOT_API_URL=sandbox_url,
    )


@pytest.fixture
async def two_portals(install_portal: Any) -> list[Any]:
    return [await install_portal(1001), await install_portal(1003)]


async def test_portals_list_shows_every_portal(
    two_portals: Any, database_url: str, tmp_path: Path
) -> None:
    code, out, _ = await hubline(
        "portals", "list", "--json", database_url=database_url, cwd=tmp_path
    )
    assert code == 0
    portals = json.loads(out)
    assert [(p["portal_id"], p["status"]) for p in portals] == [(1001, "active"), (1003, "active")]
    assert "whsec_" not in out

    code, out, _ = await hubline("portals", "list", database_url=database_url, cwd=tmp_path)
    assert code == 0
    assert "1001" in out
    assert "acme-dental.sandbox.hubspot.test" in out


async def test_portals_show_gives_details_and_no_secret(
    two_portals: Any, database_url: str, tmp_path: Path
) -> None:
    code, out, _ = await hubline(
        "portals", "show", "1003", "--json", database_url=database_url, cwd=tmp_path
    )
    assert code == 0
    shown = json.loads(out)
    assert shown["portal_id"] == 1003
    assert shown["webhook_url"] == "http://hubline.test/webhooks/portals/1003/receptionist"
    code, out, _ = await hubline("portals", "show", "1003", database_url=database_url, cwd=tmp_path)
    assert code == 0
    assert "status: active" in out
    assert "whsec_" not in out
    code, out, err = await hubline(
        "portals", "show", "4242", "--json", database_url=database_url, cwd=tmp_path
    )
    assert (code, out) == (1, "")  # a script reading the JSON gets none, and the exit code
    assert "no portal 4242" in err
    for portal_id in ("99999999999999999999", "\u0661\u0660\u0660\u0663"):
        code, out, err = await hubline(
            "portals", "show", portal_id, database_url=database_url, cwd=tmp_path
        )
        assert code == 2
        assert "Traceback" not in err
        assert "is not an id" in err


async def test_rotate_secret_keeps_the_old_one_working_for_the_grace_period(
    two_portals: Any, services: Any, database_url: str, tmp_path: Path
) -> None:
    old = two_portals[0].webhook_secret
    code, out, _ = await hubline(
        "portals", "rotate-secret", "1001", "--json", database_url=database_url, cwd=tmp_path
    )
    assert code == 0
    new = json.loads(out)["secret"]
    assert new.startswith("whsec_")
    assert new != old
    async with services.sessions() as session:
        accepted = await accepted_secrets(1001, session=session, cipher=services.cipher)
        current = await current_secret(1001, session=session, cipher=services.cipher)
    assert [s.reveal() for s in accepted] == [new, old]
    assert current is not None
    assert current.reveal() == new


async def test_disconnect_uninstalls_the_app_and_queues_the_uninstall(
    two_portals: Any,
    services: Any,
    sandbox: Any,
    sandbox_app: Any,
    database_url: str,
    tmp_path: Path,
) -> None:
    from app.worker import Worker

    async with served_over_tcp(sandbox_app) as sandbox_url:
        code, out, err = await disconnect_1001(database_url, tmp_path, sandbox_url)
    assert code == 0, err
    assert "uninstalled on HubSpot: yes" in out
    assert "revoked: yes" in out
    assert sandbox.portal(1001).installed is False
    await Worker(services, poll_seconds=0.02).drain(timeout=20)

    async def uninstalled() -> bool:
        code, out, _ = await hubline(
            "portals", "show", "1001", "--json", database_url=database_url, cwd=tmp_path
        )
        return code == 0 and json.loads(out)["status"] == "uninstalled"

    await wait_until(uninstalled, timeout=30)
    code, out, _ = await hubline(
        "portals", "disconnect", "1001", database_url=database_url, cwd=tmp_path
    )
    assert (code, out.strip()) == (0, "portal 1001 is already uninstalled; nothing to do")


async def test_a_disconnect_hubspot_cannot_hear_says_so_and_leaves_the_portal_connected(
    two_portals: Any, sandbox: Any, sandbox_app: Any, database_url: str, tmp_path: Path
) -> None:
    sandbox.faults.append(Fault(count=1000, status=503, path_prefix="/appinstalls/"))
    async with served_over_tcp(sandbox_app) as sandbox_url:
        code, out, err = await disconnect_1001(database_url, tmp_path, sandbox_url)
        assert (code, out) == (1, "")
        assert "portal 1001 is still connected; try again" in err
        assert "--force" in err
        assert sandbox.portal(1001).installed is True
        code, out, _ = await hubline(
            "portals", "show", "1001", "--json", database_url=database_url, cwd=tmp_path
        )
        assert json.loads(out)["status"] == "active"
        code, out, err = await disconnect_1001(database_url, tmp_path, sandbox_url, "--force")
    assert code == 0, err
    assert "app uninstalled on HubSpot: no" in out
