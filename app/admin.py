"""The operator's API (the console pages come with the operations issue).

Every route needs `Authorization: Bearer ADMIN_TOKEN`, compared in constant time;
with ADMIN_TOKEN unset the whole console answers 404, as if it did not exist.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from app.lifecycle import portal_summaries
from app.main import services


def admin_denial(request: Request) -> Response | None:
    """The answer for a request without the admin token, or None when it carries it."""
    expected = services(request).settings.admin_token.get_secret_value()
    if not expected:
        return JSONResponse({"error": "not_found", "detail": None}, status_code=404)
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), expected.encode()
    ):
        return JSONResponse(
            {"error": "unauthorized", "detail": "send Authorization: Bearer <ADMIN_TOKEN>"},
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="hubline-admin"'},
        )
    return None


async def api_portals(request: Request) -> Response:
    """Every portal with its status, problems and (for needs_reauth) the re-consent link."""
    denial = admin_denial(request)
    if denial is not None:
        return denial
    resources = services(request)
    async with resources.sessions() as session:
        portals = await portal_summaries(session=session, settings=resources.settings)
    return JSONResponse(portals, headers={"Cache-Control": "no-store"})


routes: list[BaseRoute] = [Route("/admin/api/portals", api_portals, methods=["GET"])]
