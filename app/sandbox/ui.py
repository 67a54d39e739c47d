"""The sandbox's web UI: portals, contacts with their timelines, edits, privacy deletion,
merges, uninstall, and each portal's recent API traffic."""

from __future__ import annotations

import html
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.templating import Jinja2Templates

from app.sandbox import objects
from app.sandbox.errors import ApiError
from app.sandbox.state import UI_SOURCE, CrmObject, PortalWorld, SandboxState

TEMPLATES = Jinja2Templates(directory=Path(__file__).parent / "templates")
EDITABLE = ("firstname", "lastname", "email", "phone", "mobilephone", "company", "lifecyclestage")
TRAFFIC_ROWS = 50


def _clock(ts: float) -> str:
    moment = datetime.fromtimestamp(ts, tz=UTC)
    return moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


TEMPLATES.env.filters["clock"] = _clock


def render(
    request: Request, template: str, context: dict[str, Any], status_code: int = 200
) -> Response:
    """A rendered page."""
    return TEMPLATES.TemplateResponse(request, template, context, status_code=status_code)


def _state(request: Request) -> SandboxState:
    state: SandboxState = request.app.state.sandbox
    return state


def _world(request: Request) -> PortalWorld | None:
    try:
        return _state(request).portals.get(int(request.path_params["portal_id"]))
    except ValueError:
        return None


def _missing(request: Request, what: str) -> Response:
    return render(request, "error.html", {"title": "Not found", "message": f"No such {what}."}, 404)


def _error_text(error: ApiError) -> str:
    errors = error.body.get("errors")
    if isinstance(errors, list) and errors:
        return "; ".join(str(e.get("message")) for e in errors if isinstance(e, dict))
    return str(error.body.get("message", "The change was rejected."))


def _name(contact: CrmObject) -> str:
    props = contact.properties
    return " ".join(p for p in (props.get("firstname"), props.get("lastname")) if p) or "(no name)"


async def portals_page(request: Request) -> Response:
    """GET /: every portal."""
    state = _state(request)
    return render(request, "portals.html", {"worlds": list(state.portals.values()), "state": state})


async def portal_page(request: Request) -> Response:
    """GET /portals/{id}: contacts, install status and recent API traffic."""
    world = _world(request)
    if world is None:
        return _missing(request, "portal")
    return _portal(request, world)


def _portal(
    request: Request, world: PortalWorld, error: str | None = None, status: int = 200
) -> Response:
    state = _state(request)
    traffic = [r for r in state.request_log if r.portal_id == world.portal_id][-TRAFFIC_ROWS:]
    statuses: dict[int, int] = {}
    for (portal_id, _, status_code), n in state.request_counts.items():
        if portal_id == world.portal_id:
            statuses[status_code] = statuses.get(status_code, 0) + n
    contacts = sorted(world.live("contacts"), key=lambda c: int(c.id))
    context = {
        "world": world,
        "state": state,
        "contacts": [(c, _name(c)) for c in contacts],
        "traffic": list(reversed(traffic)),
        "statuses": sorted(statuses.items()),
        "deliveries": list(state.webhook_deliveries)[-20:][::-1],
        "error": error,
    }
    return render(request, "portal.html", context, status)


async def create_contact(request: Request) -> Response:
    """POST /portals/{id}/contacts: a person adds a contact in HubSpot."""
    world = _world(request)
    if world is None:
        return _missing(request, "portal")
    form = await request.form()
    properties = {
        k: str(form.get(k, "")).strip() for k in ("firstname", "lastname", "email", "phone")
    }
    try:
        contact = objects.create_object(
            _state(request),
            world,
            "contacts",
            {"properties": {k: v for k, v in properties.items() if v}},
            UI_SOURCE,
        )
    except ApiError as error:
        return _portal(request, world, _error_text(error), error.status_code)
    return RedirectResponse(f"/portals/{world.portal_id}/contacts/{contact.id}", status_code=303)


async def uninstall(request: Request) -> Response:
    """POST /portals/{id}/uninstall: the admin uninstalls the app."""
    world = _world(request)
    if world is None:
        return _missing(request, "portal")
    _state(request).uninstall(world.portal_id)
    return RedirectResponse(f"/portals/{world.portal_id}", status_code=303)


def _contact(request: Request) -> tuple[PortalWorld, CrmObject] | Response:
    world = _world(request)
    if world is None:
        return _missing(request, "portal")
    contact = world.get("contacts", str(request.path_params["contact_id"]))
    if contact is None:
        return _missing(request, "contact")
    return world, contact


def _contact_page(
    request: Request,
    world: PortalWorld,
    contact: CrmObject,
    error: str | None = None,
    status: int = 200,
) -> Response:
    defs = world.properties["contacts"]
    editable = [defs[n] for n in EDITABLE if n in defs] + [
        p for p in defs.values() if not p.hubspot_defined and not p.read_only_value
    ]
    timeline: list[dict[str, Any]] = []
    for object_type in ("calls", "notes"):
        for engagement_id in world.associated("contacts", contact.id, object_type):
            engagement = world.get(object_type, engagement_id)
            if engagement is None:
                continue
            props = engagement.properties
            timeline.append(
                {
                    "kind": "call" if object_type == "calls" else "note",
                    "id": engagement.id,
                    "when": props.get("hs_timestamp", ""),
                    "title": props.get(
                        "hs_call_title", "Note" if object_type == "notes" else "Call"
                    ),
                    "body": _shown_as_text(
                        props.get("hs_call_body") or props.get("hs_note_body") or ""
                    ),
                    "properties": sorted(props.items()),
                }
            )
    timeline.sort(key=lambda t: t["when"], reverse=True)
    others = [(c, _name(c)) for c in world.live("contacts") if c.id != contact.id]
    context = {
        "world": world,
        "contact": contact,
        "name": _name(contact),
        "properties": sorted((k, v) for k, v in contact.properties.items() if k in defs),
        "editable": editable,
        "timeline": timeline,
        "others": others,
        "error": error,
    }
    return render(request, "contact.html", context, status)


async def contact_page(request: Request) -> Response:
    """GET /portals/{id}/contacts/{contact_id}: values, timeline and actions."""
    found = _contact(request)
    if isinstance(found, Response):
        return found
    return _contact_page(request, *found)


async def edit_contact(request: Request) -> Response:
    """POST .../edit: write the changed fields (validated like the API)."""
    found = _contact(request)
    if isinstance(found, Response):
        return found
    world, contact = found
    form = await request.form()
    changes = {
        key[2:]: str(value).strip()
        for key, value in form.items()
        if key.startswith("p_") and str(value).strip() != contact.properties.get(key[2:], "")
    }
    try:
        objects.update_object(_state(request), world, contact, changes, UI_SOURCE)
    except ApiError as error:
        return _contact_page(request, world, contact, _error_text(error), error.status_code)
    return RedirectResponse(f"/portals/{world.portal_id}/contacts/{contact.id}", status_code=303)


async def delete_contact(request: Request) -> Response:
    """POST .../delete: a privacy (GDPR) deletion."""
    found = _contact(request)
    if isinstance(found, Response):
        return found
    world, contact = found
    objects.privacy_delete_contact(_state(request), world, contact, UI_SOURCE)
    return RedirectResponse(f"/portals/{world.portal_id}", status_code=303)


async def merge_contact(request: Request) -> Response:
    """POST .../merge: merge the chosen contact into this one."""
    found = _contact(request)
    if isinstance(found, Response):
        return found
    world, contact = found
    other = str((await request.form()).get("merge_with", ""))
    try:
        primary = objects.merge_contacts(_state(request), world, contact.id, other, UI_SOURCE)
    except ApiError as error:
        return _contact_page(request, world, contact, _error_text(error), error.status_code)
    return RedirectResponse(f"/portals/{world.portal_id}/contacts/{primary.id}", status_code=303)


async def hubspot_record_link(request: Request) -> Response:
    """HubSpot's own record URL shape (`/contacts/{portal}/record/0-1/{id}`), as apps link to it."""
    portal_id = request.path_params["portal_id"]
    contact_id = request.path_params["contact_id"]
    return RedirectResponse(f"/portals/{portal_id}/contacts/{contact_id}", status_code=302)


def routes() -> list[BaseRoute]:
    """The UI routes."""
    contact = "/portals/{portal_id}/contacts/{contact_id}"
    return [
        Route("/", portals_page, methods=["GET"]),
        Route("/portals/{portal_id}", portal_page, methods=["GET"]),
        Route("/portals/{portal_id}/contacts", create_contact, methods=["POST"]),
        Route("/portals/{portal_id}/uninstall", uninstall, methods=["POST"]),
        Route(contact, contact_page, methods=["GET"]),
        Route(f"{contact}/edit", edit_contact, methods=["POST"]),
        Route(f"{contact}/delete", delete_contact, methods=["POST"]),
        Route(f"{contact}/merge", merge_contact, methods=["POST"]),
        Route("/contacts/{portal_id}/record/0-1/{contact_id}", hubspot_record_link),
    ]


def _shown_as_text(body: str) -> str:
    """An engagement body (HTML, as HubSpot stores it) as the text its timeline shows."""
    # HubSpot renders the markup; shown escaped, "<br>" and "&#x27;" would read as if the
    # app had garbled the caller's words. The template escapes the text again.
    lines = re.sub(r"<br\s*/?>", "\n", body, flags=re.IGNORECASE)
    return html.unescape(re.sub(r"<[^>]*>", "", lines))
