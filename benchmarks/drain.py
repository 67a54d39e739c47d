"""Measurements 1 and 2: HubSpot requests per 100 events, and drain speed under HubSpot's limits.

Hubline: `hubline serve --no-worker` installed into sandbox portal 1001 through the
OAuth flow; the realistic mix is POSTed to its receptionist webhook (50 senders), and
once all of it is stored a `hubline worker` process starts and drains the backlog: the
figure runs from the worker's start, with every event already received, to the last
event synced (the inbox's own `finished_at`; a text whose note a full batch queued is
synced when its `receptionist.note` event is, so the figure runs to the last of those).
Delivering with the worker running would measure intake instead (it is slower than the
budget allows; see measurement 3), and the HubSpot limits would never bind. The baseline
gets its sample of the same kind of traffic all at once too, and syncs it into portal
1002 while Hubline drains (HubSpot's limits are per portal, so neither spends the
other's budget). The sandbox enforces HubSpot's limits (110 requests per rolling 10 s, 5
searches per second) and adds 50 ms to every request; its request counts per portal,
endpoint and status are the ground truth.

The sandbox delivers no contact webhooks here. Hubline's index learns every contact it
writes in the batch that writes it, so the echoes of its own writes (a creation and a
phone or email change per new caller, if HubSpot sends an app the events of its own
writes, which is unconfirmed) would only cost the worker one batch read per 100 of them:
about one more request per 100 events, left out of this figure. Search lag is 0, which
spares the baseline the duplicates a lag would cost it. Returning callers who predate
the install are seeded into both portals before the run with the limits switched off, so
seeding spends nobody's budget and is not counted.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from app.settings import Settings
from app.sync import NOTE_LATER
from benchmarks import harness
from benchmarks.baseline import BaselineRun, GuideIntegration, Tokens, new_http_client
from benchmarks.context import Bench
from benchmarks.report import Row, fmt, verdict
from benchmarks.workload import Workload, realistic_mix, write_signed_requests

HUBLINE_PORTAL = 1001
BASELINE_PORTAL = 1002
BATCH_CREATE = "/crm/v3/objects/contacts/batch/create"

EFFICIENCY_TARGET = 5.0  # requests per 100 events, at most
EFFICIENCY_RATIO_TARGET = 60.0
SPEED_RATIO_TARGET = 60.0
CEILING_SHARE_TARGET = 0.85


@dataclass
class Spend:
    """What the sandbox saw one portal send during a measurement."""

    counts: Counter[tuple[str, int]]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def rate_limited(self) -> int:
        return sum(n for (_, status), n in self.counts.items() if status == 429)

    @property
    def answered(self) -> int:
        """Requests HubSpot did work for (a 429 does none)."""
        return self.total - self.rate_limited

    def searches(self) -> int:
        return sum(n for (endpoint, _), n in self.counts.items() if endpoint.endswith("/search"))

    def by_endpoint(self) -> dict[str, int]:
        merged: Counter[str] = Counter()
        for (endpoint, status), n in self.counts.items():
            merged[f"{endpoint} {status}"] += n
        return dict(sorted(merged.items()))


async def seed_portal(
    bench: Bench, http: httpx.AsyncClient, portal_id: int, workload: Workload
) -> dict[str, Any]:
    """Tokens straight from the sandbox's OAuth flow, and the pre-existing contacts."""
    answer = await harness.sandbox_tokens(bench.http, bench.sandbox.url, portal_id)
    tokens = Tokens.from_answer(
        answer,
        api_url=bench.sandbox.url,
        client_id=harness.CLIENT_ID,
        client_secret=harness.CLIENT_SECRET,
    )
    writer = GuideIntegration(http, bench.sandbox.url, tokens)
    for start in range(0, len(workload.seed_contacts), 100):
        chunk = workload.seed_contacts[start : start + 100]
        await writer.call("POST", BATCH_CREATE, {"inputs": [{"properties": p} for p in chunk]})
    return answer


# The portal's receptionist events and the notes they queued: the drain's work.
_DRAIN_WORK = "portal_id = :portal AND (source = 'receptionist' OR type = :note)"


async def inbox_progress(database_url: str, portal_id: int) -> Counter[str]:
    """The portal's receptionist events by status, and the notes queued for later
    (`queued notes <status>`): a text is synced once its note is written."""
    async with harness.engine_for(database_url) as engine, engine.connect() as connection:
        rows = await connection.execute(
            sa.text(
                f"SELECT source, status, count(*) FROM events WHERE {_DRAIN_WORK} "  # noqa: S608
                "GROUP BY source, status"
            ),
            {"portal": portal_id, "note": NOTE_LATER},
        )
        return Counter(
            {
                status if source == "receptionist" else f"queued notes {status}": int(n)
                for source, status, n in rows
            }
        )


async def drain_window(database_url: str, portal_id: int) -> tuple[datetime, datetime]:
    """The first receipt of the portal's receptionist events, and the last finish of
    them and of the notes they queued."""
    async with harness.engine_for(database_url) as engine, engine.connect() as connection:
        first, last = (
            await connection.execute(
                sa.text(
                    "SELECT min(received_at), max(finished_at) FROM events "  # noqa: S608
                    f"WHERE {_DRAIN_WORK}"
                ),
                {"portal": portal_id, "note": NOTE_LATER},
            )
        ).one()
    return harness.as_utc(first), harness.as_utc(last)


async def queued_note_waits(database_url: str, portal_id: int) -> list[float]:
    """Seconds from each text's finish (contact written, note queued) to its note's record."""
    async with harness.engine_for(database_url) as engine, engine.connect() as connection:
        rows = await connection.execute(
            sa.text(
                "SELECT events.finished_at, engagements.created_at FROM events "
                "JOIN engagements ON engagements.event_id = events.id "
                "WHERE events.portal_id = :portal AND engagements.object_type = 'notes'"
            ),
            {"portal": portal_id},
        )
        waits = [
            (harness.as_utc(noted) - harness.as_utc(finished)).total_seconds()
            for finished, noted in rows
        ]
    # A note written with its text is recorded in the same transaction (a wait of about 0).
    return sorted(w for w in waits if w > 0.001)


async def unfinished(database_url: str, portal_id: int) -> int:
    query = (
        "SELECT count(*) FROM events WHERE portal_id = :portal "
        "AND status IN ('pending', 'in_progress')"
    )
    return int(await harness.scalar(database_url, query, portal=portal_id))


async def send_workload(bench: Bench, url: str, requests_file: Any) -> dict[str, Any]:
    """Deliver the file's lines once, 50 senders at a time, from a separate process, for
    at most `drain_delivery_s`: a prefix of the workload arrives (`lines` long)."""
    process = await asyncio.create_subprocess_exec(
        harness.PYTHON,
        "-m",
        "benchmarks.loadgen",
        "--url",
        url,
        "--requests",
        str(requests_file),
        "--concurrency",
        str(bench.options.intake_concurrency),
        "--max-seconds",
        str(bench.options.drain_delivery_s),
        # Whole hundreds: the worker's batches are then all full, and one partial batch
        # at the end does not tilt a per-100 figure.
        "--multiple",
        "100",
        cwd=harness.REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the load generator failed: {err.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(out)
    return result


async def run_baseline(bench: Bench, workload: Workload, answer: dict[str, Any]) -> BaselineRun:
    async with new_http_client() as http:
        tokens = Tokens.from_answer(
            answer,
            api_url=bench.sandbox.url,
            client_id=harness.CLIENT_ID,
            client_secret=harness.CLIENT_SECRET,
        )
        guide = GuideIntegration(http, bench.sandbox.url, tokens)
        deadline = time.monotonic() + bench.options.drain_deadline_s
        return await guide.run(workload.events, deadline=deadline)


async def measure(bench: Bench) -> None:
    """Run both sides and add rows 1 and 2 to the report."""
    options = bench.options
    sandbox = bench.sandbox
    hub_load = realistic_mix(options.drain_events, seed=9, prefix="h")
    base_load = realistic_mix(options.baseline_events, seed=11, prefix="b")

    # Seeding and the baseline's one-time property setup happen with the limits off.
    await sandbox.settings(requests_per_10s=None, searches_per_second=None)
    async with new_http_client() as http:
        await seed_portal(bench, http, HUBLINE_PORTAL, hub_load)
        base_answer = await seed_portal(bench, http, BASELINE_PORTAL, base_load)
        setup = GuideIntegration(
            http,
            sandbox.url,
            Tokens.from_answer(
                base_answer,
                api_url=sandbox.url,
                client_id=harness.CLIENT_ID,
                client_secret=harness.CLIENT_SECRET,
            ),
        )
        await setup.provision()
    await sandbox.settings(requests_per_10s=110, searches_per_second=5)

    kind = options.drain_database
    database_url = await bench.databases.fresh(kind, "drain")
    web = await harness.start_hubline(
        bench.stack,
        "hubline-drain-web",
        database_url=database_url,
        sandbox_url=sandbox.url,
        worker=False,
    )
    installed = await harness.install_portal(web.url, sandbox.url, HUBLINE_PORTAL)

    async def start_worker(name: str, stats: Path | None = None) -> harness.Proc:
        return await harness.start_worker(
            bench.stack,
            name,
            database_url=database_url,
            sandbox_url=sandbox.url,
            public_url=web.url,
            stats=stats,
        )

    # Install-time provisioning (properties, options) is a one-off and not counted.
    provisioner = await start_worker("hubline-drain-provision")
    await harness.wait_for(lambda: _idle(database_url, HUBLINE_PORTAL), timeout=60, every=0.2)
    await bench.stack.stop(provisioner)

    # The backlog arrives first, through the receptionist webhook; then one worker drains
    # it. Delivered with the worker running, the figure would measure intake (row 3),
    # which is slower than the budget allows, and the HubSpot limits would never bind.
    requests_file = write_signed_requests(
        hub_load.events, installed.webhook_secret, bench.work_dir / "drain.tsv"
    )
    delivery = await send_workload(bench, installed.webhook_url, requests_file)
    hub_load = hub_load.prefix(int(delivery["lines"]))
    hub_before = await sandbox.request_counts(HUBLINE_PORTAL)
    base_before = await sandbox.request_counts(BASELINE_PORTAL)

    started_at = datetime.now(UTC)
    started = time.monotonic()
    sandbox_cpu = harness.cpu_seconds(sandbox.proc.pid)
    worker_stats = bench.work_dir / "drain-worker.json"
    worker = await start_worker("hubline-drain-worker", worker_stats)
    baseline_task = asyncio.create_task(run_baseline(bench, base_load, base_answer))
    deadline = started + options.drain_deadline_s
    finished = Counter[str]()
    while time.monotonic() < deadline:
        finished = await inbox_progress(database_url, HUBLINE_PORTAL)
        if not _unfinished(finished):
            break
        await asyncio.sleep(0.5)
    timed_out = _unfinished(finished)
    # A graceful stop finishes (or releases) the batch in flight, so the events counted
    # done and the requests counted belong together.
    await bench.stack.stop(worker)
    sandbox_cpu = harness.cpu_seconds(sandbox.proc.pid) - sandbox_cpu
    hubspot_log = await sandbox.request_log(HUBLINE_PORTAL, since=started_at.timestamp())
    finished = await inbox_progress(database_url, HUBLINE_PORTAL)
    hub_spend = Spend((await sandbox.request_counts(HUBLINE_PORTAL)) - hub_before)
    first_receipt, last_finish = await drain_window(database_url, HUBLINE_PORTAL)
    window_s = (last_finish - started_at).total_seconds()
    baseline = await baseline_task
    base_spend = Spend((await sandbox.request_counts(BASELINE_PORTAL)) - base_before)
    hub_crm = await sandbox.portal_summary(HUBLINE_PORTAL)
    base_crm = await sandbox.portal_summary(BASELINE_PORTAL)
    await bench.stack.stop(web)
    delivery["end_to_end_s"] = (last_finish - first_receipt).total_seconds()
    delivery["note_waits"] = await queued_note_waits(database_url, HUBLINE_PORTAL)
    worker_cost = json.loads(await asyncio.to_thread(worker_stats.read_text))
    worker_cost["hubspot_seconds"] = sum(r["duration_ms"] for r in hubspot_log) / 1000
    worker_cost["hubspot_logged"] = len(hubspot_log)
    worker_cost["sandbox_cpu_s"] = sandbox_cpu

    # The budget the worker ran with: the settings' defaults (the run sets neither).
    fields = Settings.model_fields
    budget = (
        int(fields["hubspot_requests_per_10s"].default),
        int(fields["hubspot_searches_per_second"].default),
    )
    _add_rows(
        bench,
        hub_load=hub_load,
        base_load=base_load,
        synced=finished["done"],
        finished=finished,
        window_s=window_s,
        timed_out=timed_out,
        hub_spend=hub_spend,
        base_spend=base_spend,
        baseline=baseline,
        hub_crm=hub_crm,
        base_crm=base_crm,
        delivery=delivery,
        budget=budget,
        database=kind,
        worker_cost=worker_cost,
    )


def _note_waits(waits: list[float]) -> str:
    if not waits:
        return "no texts' notes were queued"
    median = waits[len(waits) // 2]
    return (
        f"{len(waits):,} texts' notes were queued (full batches) and written "
        f"{median:.1f}s (median) and at most {waits[-1]:.1f}s after their text's contact"
    )


def _unfinished(progress: Counter[str]) -> bool:
    return any(
        progress[f"{prefix}{status}"]
        for prefix in ("", "queued notes ")
        for status in ("pending", "in_progress")
    )


async def _idle(database_url: str, portal_id: int) -> bool:
    return await unfinished(database_url, portal_id) == 0


def _add_rows(
    bench: Bench,
    *,
    hub_load: Workload,
    base_load: Workload,
    synced: int,
    finished: Counter[str],
    window_s: float,
    timed_out: bool,
    hub_spend: Spend,
    base_spend: Spend,
    baseline: BaselineRun,
    hub_crm: dict[str, Any],
    base_crm: dict[str, Any],
    delivery: dict[str, Any],
    budget: tuple[int, int],
    database: str,
    worker_cost: dict[str, Any],
) -> None:
    report = bench.report
    per_100 = 100 * hub_spend.total / synced if synced else None
    # The baseline's efficiency counts only answered requests: its 429s are not work, and
    # counting them would flatter Hubline.
    base_per_100 = 100 * base_spend.answered / baseline.synced if baseline.synced else None
    efficiency_ratio = base_per_100 / per_100 if per_100 and base_per_100 else None
    report.add(
        Row(
            "1. HubSpot requests per 100 events",
            fmt(per_100, 2),
            fmt(base_per_100, 1),
            f"{efficiency_ratio:,.0f}x fewer" if efficiency_ratio else "-",
            f"<= {EFFICIENCY_TARGET:g}; >= {EFFICIENCY_RATIO_TARGET:g}x fewer",
            verdict(
                None
                if per_100 is None or efficiency_ratio is None
                else per_100 <= EFFICIENCY_TARGET and efficiency_ratio >= EFFICIENCY_RATIO_TARGET
            ),
            f"Hubline {synced:,} events, baseline {baseline.synced:,}; mix: "
            f"{hub_load.new_callers / len(hub_load.events):.0%} new callers, "
            f"{hub_load.texts / len(hub_load.events):.0%} texts, mixed phone formats",
        )
    )
    speed = synced / window_s if window_s else None
    base_speed = baseline.events_per_second or None
    speed_ratio = speed / base_speed if speed and base_speed else None
    report.add(
        Row(
            "2. drain speed, events/s (one portal)",
            fmt(speed, 1),
            fmt(base_speed, 2),
            f"{speed_ratio:,.0f}x" if speed_ratio else "-",
            f">= {SPEED_RATIO_TARGET:g}x",
            verdict(None if speed_ratio is None else speed_ratio >= SPEED_RATIO_TARGET),
            f"{synced:,} events synced in {window_s:.1f}s from the worker's start, all of them "
            "already received"
            + (" (stopped at the deadline)" if timed_out else "")
            + f"; they took {delivery['elapsed_s']:.0f}s to deliver through the webhook "
            f"({delivery['rps']:.0f}/s at 50 senders, the worker off), "
            f"{delivery['end_to_end_s']:.0f}s from first receipt to last synced; "
            f"baseline {baseline.synced} events in {baseline.elapsed_s:.1f}s, run alongside; "
            + _note_waits(delivery["note_waits"]),
        )
    )
    requests_limit, searches_limit = budget
    non_search = hub_spend.total - hub_spend.searches()
    ceiling = None
    if synced:
        per_event_ns = non_search / synced
        per_event_s = hub_spend.searches() / synced
        limits = []
        if per_event_ns:
            limits.append(requests_limit / 10 / per_event_ns)
        if per_event_s:
            limits.append(searches_limit / per_event_s)
        ceiling = min(limits) if limits else None
    share = speed / ceiling if speed and ceiling else None
    statements_per_event = worker_cost["statements"] / synced if synced else None
    cpu_ms_per_event = 1000 * worker_cost["cpu_s"] / synced if synced else None
    worker_cpu_share = worker_cost["cpu_s"] / worker_cost["seconds"]
    # Where a batch's time goes: HubSpot answering (as the sandbox timed it, its 50 ms
    # included), the worker's CPU, and the rest (mostly waiting on the database).
    batches = synced / 100 if synced else None
    per_batch = {
        "seconds": window_s / batches if batches else None,
        "hubspot_s": worker_cost["hubspot_seconds"] / batches if batches else None,
        "worker_cpu_s": worker_cost["cpu_s"] / batches if batches else None,
        "statements": worker_cost["statements"] / batches if batches else None,
    }
    report.add(
        Row(
            "2. drain speed, share of budget ceiling",
            f"{share:.0%}" if share is not None else "-",
            "-",
            "-",
            f">= {CEILING_SHARE_TARGET:.0%}",
            verdict(None if share is None else share >= CEILING_SHARE_TARGET),
            f"ceiling {fmt(ceiling, 1)} events/s = budget {requests_limit}/10s and "
            f"{searches_limit} searches/s over {non_search / max(synced, 1) * 100:.2f} "
            f"requests + {hub_spend.searches() / max(synced, 1) * 100:.2f} searches per 100 "
            "events (the first 10 s may also spend a full window, so >100% is possible); "
            f"one batch of 100 events took {fmt(per_batch['seconds'], 2)}s: HubSpot answered "
            f"its requests in {fmt(per_batch['hubspot_s'], 2)}s in all, the worker spent "
            f"{fmt(per_batch['worker_cpu_s'], 2)}s of CPU and ran "
            f"{fmt(per_batch['statements'], 0)} database statements (the worker used "
            f"{worker_cpu_share:.0%} of a core, the sandbox "
            f"{worker_cost['sandbox_cpu_s'] / window_s:.0%})",
        )
    )
    report.add(
        Row(
            "2. 429 answers during the drain",
            f"{hub_spend.rate_limited}",
            f"{base_spend.rate_limited}",
            "-",
            "0",
            verdict(hub_spend.rate_limited == 0 if synced else None),
        )
    )
    expected_contacts = hub_load.expected_contacts
    hub_correct = (
        hub_crm["contacts"] == expected_contacts
        and hub_crm["calls"] == hub_load.calls
        and hub_crm["notes"] == hub_load.texts
    )
    report.add(
        Row(
            "   CRM after the drain (contacts/calls/notes)",
            f"{hub_crm['contacts']}/{hub_crm['calls']}/{hub_crm['notes']}",
            f"{base_crm['contacts']}/{base_crm['calls']}/{base_crm['notes']}",
            "-",
            "as expected",
            verdict(hub_correct if not timed_out else None),
            f"expected Hubline {expected_contacts}/{hub_load.calls}/{hub_load.texts}, "
            f"baseline {base_load.expected_contacts}/{base_load.calls}/{base_load.texts}",
        )
    )
    report.results["drain"] = {
        "database": database,
        "hubline": {
            "events_sent": len(hub_load.events),
            "delivered_2xx": delivery["ok"],
            "delivery_s": delivery["elapsed_s"],
            "delivery_rps": delivery["rps"],
            "delivery_p99_ms": delivery["p99_ms"],
            "end_to_end_s": delivery["end_to_end_s"],
            "statuses": dict(finished),
            "synced": synced,
            "window_s": window_s,
            "timed_out": timed_out,
            "events_per_s": speed,
            "requests": hub_spend.total,
            "searches": hub_spend.searches(),
            "rate_limited": hub_spend.rate_limited,
            "requests_per_100": per_100,
            "ceiling_events_per_s": ceiling,
            "ceiling_share": share,
            "budget": {"requests_per_10s": requests_limit, "searches_per_second": searches_limit},
            "by_endpoint": hub_spend.by_endpoint(),
            "worker": {
                "cpu_share": worker_cpu_share,
                "cpu_ms_per_event": cpu_ms_per_event,
                "statements_per_event": statements_per_event,
                "statements_by_kind": worker_cost["kinds"],
                "max_rss_mib": worker_cost["max_rss_mib"],
                "per_batch": per_batch,
                "sandbox_cpu_share": worker_cost["sandbox_cpu_s"] / window_s,
            },
            "crm": {k: hub_crm[k] for k in ("contacts", "calls", "notes")},
            "expected_crm": {
                "contacts": expected_contacts,
                "calls": hub_load.calls,
                "notes": hub_load.texts,
            },
        },
        "baseline": {
            "events": len(base_load.events),
            "synced": baseline.synced,
            "failed": baseline.failed,
            "elapsed_s": baseline.elapsed_s,
            "events_per_s": baseline.events_per_second,
            "requests": base_spend.total,
            "answered_requests": base_spend.answered,
            "rate_limited": base_spend.rate_limited,
            "requests_per_100": base_per_100,
            "by_endpoint": base_spend.by_endpoint(),
            "crm": {k: base_crm[k] for k in ("contacts", "calls", "notes")},
            "errors": baseline.errors[:5],
        },
        "ratios": {"efficiency": efficiency_ratio, "speed": speed_ratio},
    }
