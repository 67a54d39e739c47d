"""Run 5: the portal's admin uninstalls the app while 100 of its events are being synced.

HubSpot revokes the tokens and journals the uninstall; Hubline must notice, delete the
tokens, stop calling HubSpot for the portal (at the latest one lease after recording
the uninstall), and park the events it had not synced yet. Another portal syncs on.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import sqlalchemy as sa

from app import db
from app.models import OAuthToken, Portal
from reliability.crash import wait_drained
from reliability.report import RunResult, say
from reliability.stack import Postgres, Stack, running_stack
from reliability.traffic import DeliveryLog, deliver_all, plan_events
from reliability.verify import account

TARGET, BYSTANDER = 5001, 5002
LEASE_SECONDS = 30.0  # `hubline worker`'s lease


async def _portal_state(database_url: str) -> tuple[str, float | None, bool]:
    """(status, uninstalled_at epoch, tokens still stored) of the target portal."""
    engine = db.create_engine(database_url, poolclass=sa.NullPool)
    try:
        async with db.session_factory(engine)() as session:
            portal = await session.get(Portal, TARGET, populate_existing=True)
            tokens = await session.get(OAuthToken, TARGET, populate_existing=True)
    finally:
        await engine.dispose()
    assert portal is not None
    at = portal.uninstalled_at.timestamp() if portal.uninstalled_at else None
    return str(portal.status), at, tokens is not None


async def _first_sync_request(stack: Stack, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        traffic = await stack.sandbox_get("/_sandbox/requests", portal_id=TARGET, limit=500)
        if any("/crm/v3/objects/" in r["path"] for r in traffic["requests"]):
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("the target portal's events never started syncing")


async def run_uninstall(postgres: Postgres, log_dir: Path, *, events: int = 100) -> RunResult:
    result = RunResult(
        5, "uninstall under load", f"HubSpot-side uninstall while {events} events sync"
    )
    rng = random.Random(5)
    planned = plan_events([TARGET], events, rng=rng, prefix="uninstall")
    others = plan_events([BYSTANDER], 50, rng=rng, prefix="bystander")
    log = DeliveryLog()
    async with running_stack(
        postgres, log_dir, [TARGET, BYSTANDER], journal_poll_seconds=2
    ) as stack:
        await stack.install_all()
        for _ in range(2):
            stack.start_worker("hubline")
        await wait_drained(stack.database_url, timeout=120, source=None)
        # Slow HubSpot down so the batch is still in flight when the uninstall lands.
        await stack.sandbox_post("/_sandbox/settings", {"latency_seconds": 0.4})
        secrets = {p: i.secret for p, i in stack.installed.items()}
        await deliver_all(stack.web_url, secrets, planned + others, log)
        await _first_sync_request(stack)
        await asyncio.sleep(rng.uniform(0.2, 1.0))
        triggered = time.time()
        await stack.sandbox_post(f"/_sandbox/portals/{TARGET}/uninstall", {})
        say("uninstalled on the sandbox")
        recorded_at: float | None = None
        tokens_gone_at: float | None = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (recorded_at is None or tokens_gone_at is None):
            status, at, has_tokens = await _portal_state(stack.database_url)
            if at is not None and status == "uninstalled":
                recorded_at = at
            if not has_tokens and tokens_gone_at is None:
                tokens_gone_at = time.time()
            await asyncio.sleep(0.05)
        # Keep watching for one lease and a margin: nothing may reach HubSpot for it.
        await asyncio.sleep(LEASE_SECONDS + 5)
        await wait_drained(stack.database_url, timeout=120, source="receptionist")
        traffic = await stack.sandbox_get("/_sandbox/requests", portal_id=TARGET, limit=10**6)
        await stack.sandbox_post("/_sandbox/settings", {"latency_seconds": 0.0})
        target = await account(stack, planned, log.accepted())
        bystander = await account(stack, others, log.accepted())
    starts = [r["at"] - r["duration_ms"] / 1000 for r in traffic["requests"]]
    last_call = max(starts) if starts else None
    late = [s for s in starts if recorded_at is not None and s > recorded_at + LEASE_SECONDS]
    result.sent = log.sent
    result.lost = target.lost + bystander.lost
    result.duplicated = target.duplicate_engagements + bystander.duplicate_engagements
    result.details = {
        "synced_before_uninstall": target.synced,
        "parked": target.parked,
        "target_statuses": target.statuses,
        "uninstall_recorded_after_s": round(recorded_at - triggered, 2) if recorded_at else None,
        "tokens_gone_after_s": round(tokens_gone_at - triggered, 2) if tokens_gone_at else None,
        "last_call_after_recorded_s": (
            round(last_call - recorded_at, 2) if last_call and recorded_at else None
        ),
        "calls_later_than_one_lease": len(late),
        "bystander_synced": bystander.synced,
    }
    result.check("the uninstall was recorded", recorded_at is not None)
    result.check(
        "tokens gone within 1 s of the uninstall being recorded",
        tokens_gone_at is not None
        and recorded_at is not None
        and tokens_gone_at - recorded_at <= 1.0,
    )
    result.check(
        "no HubSpot call later than recorded + one lease", recorded_at is not None and not late
    )
    result.check(
        "its remaining events parked, none pending or failed",
        target.synced + target.parked == events and target.parked > 0,
    )
    result.check("no duplicates", result.duplicated == 0)
    result.check("the other portal synced everything", bystander.synced == len(others))
    return result
