"""/metrics: counters move with what the routes and the worker do; no label names a portal."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from app.db import DATABASE_PROBE_SECONDS, sqlite_path, transaction
from app.inbox import NewEvent, enqueue_many
from app.metrics import endpoint_label
from app.models import EventSource, EventStatus, Portal, PortalStatus, utcnow
from tests.outage import database_outage
from tests.support_hubline import free_port, hubline_env, served_over_tcp, wait_until
from tests.webhook_support import call_event


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(snapshot: dict[Any, float], name: str, **labels: str) -> float:
    return snapshot.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_count_accepted_duplicate_and_rejected_events(
    client: httpx.AsyncClient, install_portal: Any
) -> None:
    portal = await install_portal(1001)
    before = samples((await client.get("/metrics")).text)
    auth = {"Authorization": f"Bearer {portal.webhook_secret}"}
    path = f"/webhooks/portals/{portal.portal_id}/receptionist"
    event = call_event(id="evt-metrics-1")
    assert (await client.post(path, json=event, headers=auth)).status_code == 202
    assert (await client.post(path, json=event, headers=auth)).status_code == 200
    assert (
        await client.post(path, json=event, headers={"Authorization": "Bearer wrong"})
    ).status_code == 401
    no_caller = call_event(id="evt-metrics-2", caller={"name": "Nobody"})
    assert (await client.post(path, json=no_caller, headers=auth)).status_code == 422
    response = await client.get("/metrics")
    assert response.status_code == 200
    after = samples(response.text)

    def delta(outcome: str, reason: str = "") -> float:
        labels = {"source": "receptionist", "outcome": outcome, "reason": reason}
        return value(after, "hubline_webhook_events_total", **labels) - value(
            before, "hubline_webhook_events_total", **labels
        )

    assert delta("accepted") == 1
    assert delta("duplicate") == 1
    assert delta("rejected", "unauthorized") == 1
    assert delta("rejected", "invalid_event") == 1
    assert value(after, "hubline_inbox_events", status="pending") >= 1
    assert value(after, "hubline_portals", status="active") == 1
    assert value(after, "hubline_oldest_pending_event_age_seconds") >= 0
    label_values = {v for (_name, labels) in after for _key, v in labels}
    assert str(portal.portal_id) not in label_values, "no label may name a portal"


async def test_the_inbox_gauge_counts_what_waits_not_every_event_ever_handled(
    client: httpx.AsyncClient, services: Any
) -> None:
    """Counting finished events on each scrape read the whole history (0.5-0.9 s over
    5 million events, past the probe's deadline at tens of millions): the gauge counts
    the events that wait, and finished ones are counted as they finish."""
    statuses = [EventStatus.done, EventStatus.done, EventStatus.skipped, EventStatus.failed]
    statuses += [EventStatus.pending, EventStatus.parked]
    events = [
        NewEvent(1001, EventSource.receptionist, "call.completed", f"gauge-{n}", utcnow(), {})
        for n in range(len(statuses))
    ]
    async with transaction(services.sessions) as session:
        await enqueue_many(events, session=session, cipher=services.cipher, statuses=statuses)
    exported = samples((await client.get("/metrics")).text)
    counted = {
        dict(labels)["status"]: count
        for (name, labels), count in exported.items()
        if name == "hubline_inbox_events"
    }
    assert counted == {"pending": 1, "in_progress": 0, "parked": 1, "failed": 1}


async def test_a_portal_status_no_portal_has_any_longer_reads_zero(
    client: httpx.AsyncClient, install_portal: Any, services: Any
) -> None:
    await install_portal(1001)
    before = samples((await client.get("/metrics")).text)
    assert value(before, "hubline_portals", status="active") == 1
    async with services.sessions() as session, session.begin():
        await session.execute(sa.update(Portal).values(status=PortalStatus.uninstalled))
    after = samples((await client.get("/metrics")).text)
    assert value(after, "hubline_portals", status="uninstalled") == 1
    # It read 1 still: the gauge kept the last count of a status the query no longer returned.
    assert ("hubline_portals", frozenset({("status", "active")})) in after
    assert value(after, "hubline_portals", status="active") == 0


def test_every_outcome_is_exported_before_it_first_happens() -> None:
    """An alert on the increase of failures needs the series at 0 before the first one.

    In a process of its own: this one's registry has counted what earlier tests did.
    """
    exported = subprocess.run(
        [
            sys.executable,
            "-c",
            "import app.metrics, prometheus_client; "
            "print(prometheus_client.generate_latest().decode())",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = samples(exported)
    for outcome in ("done", "skipped", "retry", "fail", "park"):
        assert found[("hubline_events_handled_total", frozenset({("outcome", outcome)}))] == 0
    for outcome in ("success", "rejected", "refused", "unavailable"):
        assert found[("hubline_token_refreshes_total", frozenset({("outcome", outcome)}))] == 0


def test_endpoint_labels_fold_ids_so_labels_stay_few() -> None:
    assert endpoint_label("/crm/v3/objects/contacts/12345") == "/crm/v3/objects/contacts/{id}"
    assert endpoint_label("/crm/v3/objects/contacts/ada@example.com?idProperty=email") == (
        "/crm/v3/objects/contacts/{id}"
    )
    assert (
        endpoint_label("/crm/v3/objects/contacts/batch/create")
        == "/crm/v3/objects/contacts/batch/create"
    )


async def test_a_worker_run_alone_serves_what_it_did_on_its_own_metrics_port(
    client: httpx.AsyncClient, install_portal: Any, sandbox_app: Any, database_url: str
) -> None:
    portal = await install_portal(1001)
    auth = {"Authorization": f"Bearer {portal.webhook_secret}"}
    path = f"/webhooks/portals/{portal.portal_id}/receptionist"
    assert (await client.post(path, json=call_event(id="evt-w-1"), headers=auth)).status_code == 202
    port = free_port()
    async with served_over_tcp(sandbox_app) as sandbox_url:
        worker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "app",
            "worker",
            "--metrics-port",
            str(port),
            env=hubline_env(database_url, HUBSPOT_API_URL=sandbox_url),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            exported: dict[Any, float] = {}

            async def handled() -> bool:
                nonlocal exported
                try:
                    async with httpx.AsyncClient() as scraper:
                        page = await scraper.get(f"http://127.0.0.1:{port}/metrics")
                except httpx.TransportError:
                    return False
                exported = samples(page.text)
                return value(exported, "hubline_events_handled_total", outcome="done") >= 1

            await wait_until(handled, timeout=30)
            # Scrapers may ask for some metrics by name (it was a 500: no registry to ask).
            async with httpx.AsyncClient() as scraper:
                some = await scraper.get(
                    f"http://127.0.0.1:{port}/metrics",
                    params={"name[]": "hubline_events_handled_total"},
                )
            assert some.status_code == 200
            assert {name for name, _ in samples(some.text)} == {"hubline_events_handled_total"}
        finally:
            worker.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(worker.wait(), timeout=30) == 0
    crm_requests = {
        dict(labels)["endpoint"]
        for (name, labels) in exported
        if name == "hubline_hubspot_requests_total"
    }
    assert any(endpoint.startswith("/crm/") for endpoint in crm_requests), crm_requests
    # Database-wide gauges come from the web app's /metrics, not as a worker's zeros.
    assert not any(
        name.startswith(("hubline_portals", "hubline_inbox_events")) for name, _ in exported
    )


async def test_the_database_gauges_are_left_out_while_the_database_cannot_be_read(
    client: httpx.AsyncClient, services: Any, database_url: str
) -> None:
    # They kept their last values, so a backlog or an age alert could not fire during
    # an outage, and nothing said the values were stale.
    database_gauges = {
        "hubline_inbox_events",
        "hubline_oldest_pending_event_age_seconds",
        "hubline_portals",
    }
    before = samples((await client.get("/metrics")).text)
    assert value(before, "hubline_database_up") == 1
    assert database_gauges <= {name for name, _ in before}
    async with database_outage(services.engine, database_url):
        during = samples((await client.get("/metrics")).text)
    assert value(during, "hubline_database_up") == 0
    assert not database_gauges & {name for name, _ in during}
    assert "hubline_hubspot_rate_limited_total" in {name for name, _ in during}  # counters stay
    after = samples((await client.get("/metrics")).text)
    assert value(after, "hubline_database_up") == 1


@pytest.mark.sqlite_only
async def test_a_database_that_stops_answering_is_reported_down_within_seconds(
    client: httpx.AsyncClient, services: Any, database_url: str
) -> None:
    """Another process holding SQLite's write lock keeps a query waiting for the busy
    timeout (30 s), as a PostgreSQL server that stopped answering keeps it waiting for
    as long as TCP does: /metrics and /readyz answer within their probe's limit."""
    path = sqlite_path(database_url)
    assert path is not None
    holder = sqlite3.connect(path, isolation_level=None, timeout=1)
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        metrics, ready = await asyncio.gather(client.get("/metrics"), client.get("/readyz"))
        waited = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert value(samples(metrics.text), "hubline_database_up") == 0
    assert ready.status_code == 503
    assert waited < DATABASE_PROBE_SECONDS + 5

    # The probes' abandoned queries end by themselves once the lock is gone, giving their
    # connections back.
    async def settled() -> bool:
        return services.engine.pool.checkedout() == 0

    await wait_until(settled)
    assert (await client.get("/readyz")).status_code == 200
