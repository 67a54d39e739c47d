"""The webhooks journal: app lifecycle entries read with an app-level token, each downloaded
from a short-lived URL.

Choices where HubSpot's documentation is silent: "no entry after this offset" answers 204
with no body (as does an empty journal); an unknown or expired offset answers 404; an
expired download URL answers 403, as an expired pre-signed storage URL does.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from app.sandbox.errors import not_found, validation_error
from app.sandbox.gateway import (
    ApiContext,
    api_route,
    batch_answer,
    json_response,
    random_token,
    read_json,
)
from app.sandbox.properties import iso
from app.sandbox.state import JournalEntry, SandboxState

SCOPE = "developer.webhooks_journal.read"
MAX_BATCH = 100


def _entries(request: Request, state: SandboxState) -> list[JournalEntry]:
    entries = state.live_journal()
    portal = request.query_params.get("installPortalId")
    if portal:
        try:
            wanted = int(portal)
        except ValueError:
            raise validation_error("installPortalId must be an integer") from None
        entries = [e for e in entries if e.portal_id == wanted]
    return entries


def _fetch_answer(state: SandboxState, entry: JournalEntry) -> dict[str, Any]:
    token = random_token()
    expires_at = state.now() + state.config.journal_url_lifetime
    state.journal_urls[token] = (entry.offset, expires_at)
    return {
        "currentOffset": entry.offset,
        "expiresAt": iso(expires_at),
        "url": f"{state.config.public_url.rstrip('/')}/_journal/files/{token}",
    }


def _after(entries: list[JournalEntry], offset: str) -> list[JournalEntry]:
    for index, entry in enumerate(entries):
        if entry.offset == offset:
            return entries[index + 1 :]
    raise not_found(f"Offset {offset} has expired or does not exist")


def _one(state: SandboxState, entries: list[JournalEntry]) -> Response:
    if not entries:
        return Response(status_code=204)
    return json_response(_fetch_answer(state, entries[0]))


def _batch(state: SandboxState, entries: list[JournalEntry], count: int) -> Response:
    if not 1 <= count <= MAX_BATCH:
        raise validation_error(f"count must be between 1 and {MAX_BATCH}")
    started = state.now()
    results = [_fetch_answer(state, e) for e in entries[:count]]
    return json_response(batch_answer(started, results, state.now()))


async def earliest(request: Request, ctx: ApiContext) -> Response:
    """GET .../earliest."""
    ctx.require_scope(SCOPE)
    return _one(ctx.state, _entries(request, ctx.state))


async def latest(request: Request, ctx: ApiContext) -> Response:
    """GET .../latest."""
    ctx.require_scope(SCOPE)
    return _one(ctx.state, _entries(request, ctx.state)[-1:])


async def next_entry(request: Request, ctx: ApiContext) -> Response:
    """GET .../offset/{offset}/next."""
    ctx.require_scope(SCOPE)
    return _one(ctx.state, _after(_entries(request, ctx.state), request.path_params["offset"]))


async def batch_earliest(request: Request, ctx: ApiContext) -> Response:
    """GET .../batch/earliest/{count}."""
    ctx.require_scope(SCOPE)
    return _batch(ctx.state, _entries(request, ctx.state), request.path_params["count"])


async def batch_latest(request: Request, ctx: ApiContext) -> Response:
    """GET .../batch/latest/{count}."""
    ctx.require_scope(SCOPE)
    count = request.path_params["count"]
    return _batch(ctx.state, _entries(request, ctx.state)[-count:] if count > 0 else [], count)


async def batch_next(request: Request, ctx: ApiContext) -> Response:
    """GET .../batch/{offset}/next/{count}."""
    ctx.require_scope(SCOPE)
    entries = _after(_entries(request, ctx.state), request.path_params["offset"])
    return _batch(ctx.state, entries, request.path_params["count"])


async def batch_read(request: Request, ctx: ApiContext) -> Response:
    """POST .../batch/read with offsets as inputs."""
    ctx.require_scope(SCOPE)
    inputs = (await read_json(request)).get("inputs")
    if not isinstance(inputs, list):
        raise validation_error("inputs must be a list of offsets")
    by_offset = {e.offset: e for e in _entries(request, ctx.state)}
    found = [by_offset[str(o)] for o in inputs if str(o) in by_offset]
    return _batch(ctx.state, found, max(len(found), 1))


async def download(request: Request) -> Response:
    """GET /_journal/files/{token}: the entry JSON; no Authorization, the URL is the secret."""
    state: SandboxState = request.app.state.sandbox
    offset, expires_at = state.journal_urls.get(request.path_params["token"], ("", 0.0))
    entry = next((e for e in state.live_journal() if e.offset == offset), None)
    if expires_at <= state.now() or entry is None:
        denied = {"status": "error", "message": "Request has expired", "category": "ACCESS_DENIED"}
        return json_response(denied, 403)
    if state.config.journal_entries_listed:
        return json_response({"journalEvents": [entry.to_json()]})
    return json_response(entry.to_json())


def routes() -> list[BaseRoute]:
    """The journal routes, global and local variants."""
    found: list[BaseRoute] = [Route("/_journal/files/{token}", download, methods=["GET"])]
    for variant in ("journal", "journal-local"):
        base = f"/webhooks-journal/{variant}/2026-03"
        found += [
            api_route(f"{base}/earliest", earliest, methods=["GET"], auth="app"),
            api_route(f"{base}/latest", latest, methods=["GET"], auth="app"),
            api_route(f"{base}/offset/{{offset}}/next", next_entry, methods=["GET"], auth="app"),
            api_route(
                f"{base}/batch/earliest/{{count:int}}", batch_earliest, methods=["GET"], auth="app"
            ),
            api_route(
                f"{base}/batch/latest/{{count:int}}", batch_latest, methods=["GET"], auth="app"
            ),
            api_route(f"{base}/batch/read", batch_read, methods=["POST"], auth="app"),
            api_route(
                f"{base}/batch/{{offset}}/next/{{count:int}}",
                batch_next,
                methods=["GET"],
                auth="app",
            ),
        ]
    return found
