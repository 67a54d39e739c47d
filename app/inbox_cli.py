"""`hubline events list|retry`: the operator's view of the inbox."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import sqlalchemy as sa
from sqlmodel import col

from app import cli, db
from app.errors import read_error_text
from app.inbox import newest_of_portal, retry_events
from app.models import EventStatus, InboxEvent, Portal

RETRY_BATCH = 500
# `events list --limit`: enough to page through a day's backlog, not the whole inbox at once.
MOST_LISTED = 10_000


def event_summary(event: InboxEvent) -> dict[str, Any]:
    """What an operator may see of an event: never its payload."""
    return {
        "id": event.id,
        "portal_id": event.portal_id,
        "source": event.source,
        "type": event.type,
        "status": event.status,
        "attempts": event.attempts,
        "occurred_at": event.occurred_at.isoformat(),
        "received_at": event.received_at.isoformat(),
        "finished_at": event.finished_at.isoformat() if event.finished_at else None,
        "contact_id": event.contact_id,
        "result": json.loads(event.result) if event.result else None,
        "last_error": event.last_error,
    }


async def cmd_events_list(args: argparse.Namespace) -> int:
    settings = cli.settings_from_environment()
    engine = db.create_engine(settings.database_url)
    statuses = tuple(EventStatus) if args.status is None else (EventStatus(args.status),)
    try:
        async with db.session_factory(engine)() as session:
            if args.portal is not None:
                # By when they happened, read through the portal's index: by id, a quiet
                # portal's events were looked for among everyone's.
                found = await newest_of_portal(
                    session, args.portal, limit=args.limit, statuses=statuses
                )
            else:
                query = sa.select(InboxEvent).order_by(col(InboxEvent.id).desc())
                if args.status is not None:
                    query = query.where(col(InboxEvent.status) == args.status)
                found = list((await session.execute(query.limit(args.limit))).scalars())
            events = [event_summary(e) for e in found]
            unknown = (
                not events
                and args.portal is not None
                and await session.get(Portal, args.portal) is None
            )
    finally:
        await engine.dispose()
    if unknown:  # as `events retry --failed --portal` says it: a typo is not "no events"
        return cli.refuse(f"no portal {args.portal}")
    if args.json:
        cli.print_json(events)
        return 0
    if not events:
        print("no events")
        return 0
    print(f"{'ID':>8}  {'PORTAL':>10}  {'STATUS':<11} {'TRIES':>5}  {'TYPE':<22} ERROR")
    for e in events:
        error = _short_error(e["last_error"] or "")
        print(
            f"{e['id']:>8}  {e['portal_id']:>10}  {e['status']:<11} {e['attempts']:>5}  "
            f"{e['type']:<22} {error}"
        )
    return 0


def _short_error(text: str, width: int = 90) -> str:
    """An error for the table, with what HubSpot answered (its status and category) kept."""
    words, fields = read_error_text(text)
    # They come last in a HubSpot error's text, where a cut would fall; the portal has its
    # own column, and the correlationId is in --json.
    kept = " ".join(f"{name}={fields[name]}" for name in ("status", "category") if name in fields)
    if not kept:
        return text if len(text) <= width else text[: width - 1] + "…"
    room = width - len(kept) - 1
    return (words if len(words) <= room else words[: room - 1] + "…") + " " + kept


async def cmd_events_retry(args: argparse.Namespace) -> int:
    usage = None
    if (args.event_id is None) == (not args.failed):
        usage = "give an event ID or --failed (not both)"
    elif args.portal is not None and not args.failed:
        usage = "--portal goes with --failed (an event ID names its portal)"
    if usage is not None:
        print(f"hubline events retry: error: {usage}", file=sys.stderr)
        return 2
    settings = cli.settings_from_environment()
    engine = db.create_engine(settings.database_url)
    sessions = db.session_factory(engine)
    try:
        if args.event_id is not None:
            async with db.transaction(sessions) as session:
                retried = await retry_events(session=session, event_ids=[args.event_id])
                status = await session.scalar(
                    sa.select(col(InboxEvent.status)).where(col(InboxEvent.id) == args.event_id)
                )
            if status is None:
                return cli.refuse(f"there is no event {args.event_id}")
            if not retried:
                return cli.refuse(
                    f"event {args.event_id} is {status}, not failed; nothing to retry"
                )
            print(f"event {args.event_id} queued again")
            return 0
        failed = sa.select(col(InboxEvent.id)).where(col(InboxEvent.status) == EventStatus.failed)
        if args.portal is not None:
            async with sessions() as session:
                if await session.get(Portal, args.portal) is None:
                    return cli.refuse(f"no portal {args.portal}")
            failed = failed.where(col(InboxEvent.portal_id) == args.portal)
        async with sessions() as session:
            ids = [
                i
                for i in (await session.execute(failed.order_by(col(InboxEvent.id)))).scalars()
                if i
            ]
        progress = cli.Progress("queueing failed events again", len(ids))
        total = 0
        for start in range(0, len(ids), RETRY_BATCH):
            async with db.transaction(sessions) as session:
                count = await retry_events(
                    session=session, event_ids=ids[start : start + RETRY_BATCH]
                )
            total += count
            progress.advance(count)
        progress.finish()
        print(f"queued {total} failed events again")
        return 0
    finally:
        await engine.dispose()


def register(commands: Any) -> None:
    events = commands.add_parser("events", help="inspect and retry inbox events")
    actions = events.add_subparsers(dest="events_command", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list",
        help="list recent events, newest first (a portal's by when they happened; never "
        "their payloads)",
    )
    listing.add_argument("--portal", type=cli.row_id)
    listing.add_argument("--status", choices=[s.value for s in EventStatus])
    listing.add_argument("--limit", type=cli.bounded_count(MOST_LISTED), default=50)
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(run=cmd_events_list, existing_database=True)
    retry = actions.add_parser("retry", help="queue a failed event (or all failed events) again")
    retry.add_argument("event_id", nargs="?", type=cli.row_id)
    retry.add_argument("--failed", action="store_true", help="every failed event")
    retry.add_argument("--portal", type=cli.row_id, help="with --failed: only this portal's")
    retry.set_defaults(run=cmd_events_retry, existing_database=True)


cli.EXTENSIONS.append(register)
