"""Runs 1 and 2: workers SIGKILLed at random moments while events arrive twice, with 503s.

Run 1 uses `hubline worker`; run 2 the same traffic with a worker that marks each batch
done before doing it, which must be reported as losing events.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass
from pathlib import Path

from reliability.report import RunResult, say
from reliability.stack import Postgres, Stack, WorkerKind, running_stack
from reliability.traffic import DeliveryLog, deliver_all, plan_events
from reliability.verify import Accounting, account, unfinished_count


@dataclass
class CrashConfig:
    events: int = 5000
    portals: int = 20
    workers: int = 3
    kills: int = 50
    fault_rate: float = 0.10
    worker_kind: WorkerKind = "hubline"
    worker_lease_seconds: float = 30.0
    kill_every: tuple[float, float] = (0.5, 3.5)
    drain_timeout: float = 900.0
    seed: int = 1
    first_portal: int = 2001


async def wait_drained(database_url: str, *, timeout: float, source: str | None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await unfinished_count(database_url, source=source) == 0:
            return True
        await asyncio.sleep(1.0)
    return False


async def kill_workers(
    stack: Stack, config: CrashConfig, rng: random.Random, kills: list[float]
) -> None:
    """SIGKILL a random live worker every few seconds and start a new one in its place."""
    while len(kills) < config.kills:
        await asyncio.sleep(rng.uniform(*config.kill_every))
        victims = stack.live_workers()
        if not victims:
            stack.start_worker(config.worker_kind)
            continue
        victim = rng.choice(victims)
        stack.processes.kill(victim)
        kills.append(time.monotonic())
        stack.start_worker(config.worker_kind)


async def crash_run(
    postgres: Postgres,
    log_dir: Path,
    config: CrashConfig,
    result: RunResult,
    *,
    database_url: str | None = None,
) -> Accounting:
    """Drive the traffic, kills and faults; fill `result` and answer the accounting."""
    rng = random.Random(config.seed)
    portal_ids = list(range(config.first_portal, config.first_portal + config.portals))
    async with running_stack(
        postgres,
        log_dir,
        portal_ids,
        database_url=database_url,
        worker_lease_seconds=config.worker_lease_seconds,
    ) as stack:
        for _ in range(config.workers):
            stack.start_worker(config.worker_kind)
        await stack.install_all()
        say(f"installed {len(portal_ids)} portals; provisioning")
        await wait_drained(stack.database_url, timeout=120, source=None)
        if config.fault_rate:
            await stack.sandbox_post(
                "/_sandbox/faults",
                {"count": 10**9, "status": 503, "probability": config.fault_rate},
            )
        planned = plan_events(portal_ids, config.events, rng=rng)
        deliveries = [*planned, *planned]
        rng.shuffle(deliveries)
        log = DeliveryLog()
        kills: list[float] = []
        started = time.monotonic()
        killer = asyncio.create_task(kill_workers(stack, config, rng, kills))

        def progress(sent: int) -> None:
            if sent % 2000 == 0:
                say(f"{sent}/{len(deliveries)} deliveries sent, {len(kills)} kills")

        try:
            await deliver_all(stack.web_url, _secrets(stack), deliveries, log, on_progress=progress)
            intake_seconds = time.monotonic() - started
            say(f"intake done in {intake_seconds:.0f} s; {len(kills)} kills so far")
            await killer
            drained = await wait_drained(
                stack.database_url, timeout=config.drain_timeout, source="receptionist"
            )
        finally:
            killer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await killer
        drain_seconds = time.monotonic() - started
        say(f"drained={drained} after {drain_seconds:.0f} s; accounting")
        with contextlib.suppress(Exception):
            await stack.sandbox_post("/_sandbox/faults", {"count": 0})
        accounting = await account(stack, planned, log.accepted())
        faults = await stack.sandbox_get("/_sandbox/requests", limit=0)
    result.sent = log.sent
    result.lost = accounting.lost
    result.duplicated = accounting.duplicate_contacts + accounting.duplicate_engagements
    result.details = {
        "events": len(planned),
        "deliveries": log.sent,
        "delivery_statuses": log.statuses(),
        "kills": len(kills),
        "intake_seconds": round(intake_seconds, 1),
        "drain_seconds": round(drain_seconds, 1),
        "synced": accounting.synced,
        "failed_visible": accounting.failed_visible,
        "unfinished": accounting.unfinished,
        "duplicate_contacts": accounting.duplicate_contacts,
        "duplicate_engagements": accounting.duplicate_engagements,
        "hubspot_answers": faults.get("by_status", {}),
        "inbox_statuses": accounting.statuses,
        "failure_reasons": accounting.failure_reasons,
        "lost_examples": accounting.lost_examples,
    }
    return accounting


def _secrets(stack: Stack) -> dict[int, str]:
    return {portal_id: portal.secret for portal_id, portal in stack.installed.items()}


async def run_crashes(
    postgres: Postgres, log_dir: Path, config: CrashConfig, *, database_url: str | None = None
) -> RunResult:
    """Run 1: nothing lost, nothing duplicated, nothing left pending."""
    result = RunResult(
        1,
        "worker crashes",
        f"{config.kills} SIGKILLs of {config.workers} workers, "
        f"{config.fault_rate:.0%} HubSpot 503s, every event twice",
    )
    accounting = await crash_run(postgres, log_dir, config, result, database_url=database_url)
    result.check(
        "every delivery answered 2xx", set(result.details["delivery_statuses"]) <= {200, 202}
    )
    result.check("0 events lost", accounting.lost == 0)
    result.check(
        "each event synced or visibly failed",
        accounting.synced + accounting.failed_visible == accounting.sent_events,
    )
    result.check("0 duplicate contacts", accounting.duplicate_contacts == 0)
    result.check("0 duplicate engagements", accounting.duplicate_engagements == 0)
    result.check("nothing left pending", accounting.unfinished == 0)
    result.check(f"{config.kills} SIGKILLs made", result.details["kills"] == config.kills)
    return result


async def run_broken_worker(
    postgres: Postgres, log_dir: Path, config: CrashConfig, *, database_url: str | None = None
) -> RunResult:
    """Run 2: the harness must see the loss a done-before-doing worker causes."""
    result = RunResult(
        2,
        "broken worker",
        f"worker marks batches done before doing them; {config.kills} SIGKILLs, "
        f"{config.fault_rate:.0%} 503s",
    )
    broken = CrashConfig(**{**config.__dict__, "worker_kind": "broken"})
    accounting = await crash_run(postgres, log_dir, broken, result, database_url=database_url)
    result.check("the harness reports lost events", accounting.lost > 0)
    return result
