"""Two processes share one PostgreSQL database: an expired token is refreshed once in all."""

from __future__ import annotations

import asyncio
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from app.models import OAuthToken, utcnow
from tests.support_hubline import hubline_env, served_over_tcp, wait_until

# Each process: open Hubline's services, say it is ready, wait for the start signal,
# then make 25 concurrent calls for portal 1001 through the HubSpot client.
CALLER = """
import asyncio, pathlib, sys
from app.hubspot import hubspot_client
from app.main import close_services, open_services
from app.settings import load_settings

async def main():
    ready, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    services = await open_services(load_settings(env_file=None))
    try:
        ready.touch()
        while not go.exists():
            await asyncio.sleep(0.005)
        client = hubspot_client(services, 1001)
        answers = await asyncio.gather(
            *(client.get_json("/crm/v3/objects/contacts") for _ in range(25))
        )
        assert all(answer == {"results": []} for answer in answers), answers
    finally:
        await close_services(services)

asyncio.run(main())
"""


@pytest.mark.postgres_only
@pytest.mark.slow
async def test_two_processes_refresh_an_expired_token_once_in_all(
    install_portal: Any,
    services: Any,
    sandbox: Any,
    sandbox_app: Any,
    database_url: str,
    tmp_path: Path,
) -> None:
    await install_portal(1001)
    sandbox.expire_portal_tokens(1001)
    async with services.sessions() as session, session.begin():
        await session.execute(
            sa.update(OAuthToken).values(expires_at=utcnow() - timedelta(seconds=1))
        )

    async with served_over_tcp(sandbox_app) as sandbox_url:
        env = hubline_env(database_url, HUBSPOT_API_URL=sandbox_url)
        go = tmp_path / "go"
        ready = [tmp_path / f"ready-{n}" for n in range(2)]
        processes = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                CALLER,
                str(flag),
                str(go),
                env=env,
                cwd=tmp_path,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            for flag in ready
        ]

        async def all_ready() -> bool:
            return all(flag.exists() for flag in ready)

        await wait_until(all_ready, timeout=60)
        go.touch()
        outputs = [await process.communicate() for process in processes]

    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr.decode()[-3000:]
    assert sandbox.refresh_count[1001] == 1
    crm_calls = [r for r in sandbox.request_log if r.path.startswith("/crm/")]
    assert len(crm_calls) == 50
    assert all(r.status == 200 for r in crm_calls)
