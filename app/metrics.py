"""Prometheus metrics. No label names a portal, so the output does not grow with portals."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

import sqlalchemy as sa
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry
from sqlmodel import col
from starlette.requests import Request
from starlette.responses import Response

from app.db import DATABASE_PROBE_SECONDS, answered_within
from app.models import EventStatus, InboxEvent, Portal, PortalStatus, utcnow
from app.retry import Action

if TYPE_CHECKING:
    from app.main import Services

WEBHOOK_EVENTS = Counter(
    "hubline_webhook_events",
    "Events received on the webhook routes, by source and outcome "
    "(accepted, duplicate, ignored, parked, rejected) and rejection reason.",
    ["source", "outcome", "reason"],
)
EVENTS_HANDLED = Counter(
    "hubline_events_handled", "Inbox events handled by the worker, by outcome.", ["outcome"]
)
RECEIPT_TO_SYNCED = Histogram(
    "hubline_receipt_to_synced_seconds",
    "Time from an event's receipt to its handler finishing successfully.",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600),
)
HUBSPOT_REQUESTS = Counter(
    "hubline_hubspot_requests",
    "Requests sent to HubSpot, by endpoint (ids folded) and status code.",
    ["endpoint", "status"],
)
HUBSPOT_RATE_LIMITED = Counter("hubline_hubspot_rate_limited", "429 answers from HubSpot.")
TOKEN_REFRESHES = Counter(
    "hubline_token_refreshes", "Token refresh attempts, by outcome.", ["outcome"]
)


def _export_every_outcome() -> None:
    """Export every outcome from the start, at 0."""
    # A series that first appears at 1 has no earlier value to rise from: an alert on its
    # increase would miss the first failure.
    for outcome in ("done", "skipped", *Action):
        EVENTS_HANDLED.labels(outcome=str(outcome))
    for outcome in ("success", "rejected", "refused", "unavailable"):
        TOKEN_REFRESHES.labels(outcome=outcome)


_export_every_outcome()
# The statuses of events that wait, on the worker or on an operator. Finished events are
# counted as they finish (hubline_events_handled_total): counting them here would read
# every event ever handled on each scrape, which in time outlasts the probe's deadline.
WAITING_STATUSES = (
    EventStatus.pending,
    EventStatus.in_progress,
    EventStatus.parked,
    EventStatus.failed,
)
INBOX_EVENTS = Gauge(
    "hubline_inbox_events",
    "Inbox events waiting, by status (pending, in_progress, parked, failed).",
    ["status"],
)
OLDEST_PENDING = Gauge(
    "hubline_oldest_pending_event_age_seconds", "Age of the oldest pending event (0 when none)."
)
PORTALS = Gauge("hubline_portals", "Portals by status.", ["status"])
DATABASE_UP = Gauge(
    "hubline_database_up",
    "1 when /metrics could read the database just now; 0 when not, and the inbox and "
    "portal gauges are then left out rather than repeat their last values.",
)

log = logging.getLogger(__name__)

# Numeric and hex ids, emails (raw or URL-encoded) and long opaque values (tokens, offsets).
_ID_SEGMENT = re.compile(
    r"/(\d+|[0-9a-f-]{16,}|[^/]+@[^/]+|[^/]*%40[^/]*|[^/]{33,})(?=/|$)", re.IGNORECASE
)
# Segments that name a customer's own thing: a marketing event's (campaign's) external id.
_NAMED_SEGMENT = re.compile(r"(/marketing-events/(?:events|attendance))/[^/]+")


def endpoint_label(path: str) -> str:
    """A HubSpot path with ids (and emails used as ids) folded, so labels stay few."""
    path = _NAMED_SEGMENT.sub(r"\1/{id}", path.split("?", 1)[0])
    return _ID_SEGMENT.sub("/{id}", path)


def count_hubspot_request(path: str, status: int | str) -> None:
    """One request sent to HubSpot and how it was answered (a status code, or `error`)."""
    HUBSPOT_REQUESTS.labels(endpoint=endpoint_label(path), status=str(status)).inc()
    if status == 429:
        HUBSPOT_RATE_LIMITED.inc()


def count_webhook(source: str, outcome: str, reason: str = "", amount: int = 1) -> None:
    WEBHOOK_EVENTS.labels(source=source, outcome=outcome, reason=reason).inc(amount)


Endpoint = Callable[[Request], Awaitable[Response]]


def counted(source: str, endpoint: Endpoint) -> Endpoint:
    """Count a webhook route's answers by outcome, read from the JSON answer it already gives."""

    async def counting(request: Request) -> Response:
        response = await endpoint(request)
        try:
            body = json.loads(bytes(response.body)) if response.body else {}
        except ValueError:
            body = {}
        if response.status_code >= 400:
            count_webhook(source, "rejected", str(body.get("error", response.status_code)))
        elif "stored" in body:  # a HubSpot batch
            count_webhook(source, "accepted", amount=int(body.get("stored", 0)))
            count_webhook(source, "duplicate", amount=int(body.get("duplicates", 0)))
            count_webhook(source, "ignored", amount=int(body.get("ignored", 0)))
            count_webhook(source, "rejected", "unreadable", amount=int(body.get("unreadable", 0)))
        else:
            count_webhook(source, str(body.get("status", "accepted")))
        return response

    return counting


async def refresh_database_gauges(services: Services) -> None:
    """Read inbox depth, the oldest pending event and portals by status from the database."""
    async with services.sessions() as session:
        by_status = dict(
            (
                await session.execute(
                    sa.select(col(InboxEvent.status), sa.func.count())
                    .where(col(InboxEvent.status).in_(WAITING_STATUSES))
                    .group_by(col(InboxEvent.status))
                )
            ).all()
        )
        oldest = (
            await session.execute(
                sa.select(sa.func.min(col(InboxEvent.received_at))).where(
                    col(InboxEvent.status) == EventStatus.pending
                )
            )
        ).scalar_one_or_none()
        portals = dict(
            (
                await session.execute(
                    sa.select(col(Portal.status), sa.func.count()).group_by(col(Portal.status))
                )
            ).all()
        )
    for status in WAITING_STATUSES:
        INBOX_EVENTS.labels(status=status.value).set(by_status.get(status.value, 0))
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=utcnow().tzinfo)
    OLDEST_PENDING.set((utcnow() - oldest).total_seconds() if oldest is not None else 0)
    # Every status, so one no portal has any longer reads 0 rather than its last count.
    for portal_status in PortalStatus:
        PORTALS.labels(status=portal_status.value).set(portals.get(portal_status.value, 0))


# Read from the database when the web app's /metrics is scraped: one answer for the whole
# deployment, which a worker's exporter must not repeat as zeros.
DATABASE_GAUGES = frozenset(
    family.name
    for gauge in (INBOX_EVENTS, OLDEST_PENDING, PORTALS, DATABASE_UP)
    for family in gauge.describe()
)


class _ProcessCounters(Collector):
    """This process's own metrics: all registered but the database gauges (save `keep`)."""

    def __init__(self, keep: Iterable[Gauge] = ()) -> None:
        self.keep = {family.name for gauge in keep for family in gauge.describe()}

    def collect(self) -> Iterable[Metric]:
        for family in REGISTRY.collect():
            if family.name not in DATABASE_GAUGES or family.name in self.keep:
                yield family


# What the web app's /metrics serves while the database cannot be read.
_WITHOUT_DATABASE = CollectorRegistry(auto_describe=True)
_WITHOUT_DATABASE.register(_ProcessCounters(keep=[DATABASE_UP]))


def export_worker_metrics(host: str, port: int) -> Callable[[], None]:
    """Serve a worker process's metrics at http://host:port/metrics; answers how to stop.

    A worker run alone counts what it does (events handled, HubSpot requests, 429s,
    refreshes) in its own process, where the web app's /metrics cannot see it.
    """
    # In a registry of its own: the exporter asks a registry, not a bare collector, for the
    # `?name[]=` filters scrapers may send.
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_ProcessCounters())
    server, thread = start_http_server(port, addr=host, registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop


async def metrics_endpoint(request: Request) -> Response:
    """Prometheus metrics."""
    from app.main import services

    try:
        await answered_within(DATABASE_PROBE_SECONDS, refresh_database_gauges(services(request)))
    except Exception as error:  # the counters are still worth serving while the database is down
        log.warning("metrics: could not read the database (%s)", type(error).__name__)
        # The gauges' last values would pass for current ones (a backlog or an age alert
        # could not fire): left out, and hubline_database_up says why.
        DATABASE_UP.set(0)
        return Response(generate_latest(_WITHOUT_DATABASE), media_type=CONTENT_TYPE_LATEST)
    DATABASE_UP.set(1)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
