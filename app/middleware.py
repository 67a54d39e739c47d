"""Request ids, the headers every answer carries, and one log line per request."""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.db import parse_id
from app.logs import portal_id_var, request_id_var

log = logging.getLogger("app.requests")

_ACCEPTABLE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# No page of Hubline's is meant to be framed: framed by another page of the same site
# (SameSite lets its cookies through), the settings page's and the console's buttons
# could be clicked through a decoy. And no answer is to be sniffed into another type.
# Raw, appended as they are: no route sets them, and this runs for every webhook too.
_EVERY_ANSWER = [
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
]


class RequestContextMiddleware:
    """Request id in and out, the headers every answer carries, one log line (no query)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _ACCEPTABLE_ID.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        # Set by the route that reads a portal id from its path (`portal_of_path`); kept
        # until the request's own log line is written, then reset with the request id.
        portal_token = portal_id_var.set(None)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = request_id
                headers.raw.extend(_EVERY_ANSWER)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            # The path only: query strings carry OAuth codes and states.
            log.info(
                "%s %s %d",
                scope["method"],
                scope["path"],
                status,
                extra={"duration_ms": round((time.perf_counter() - started) * 1000, 1)},
            )
            portal_id_var.reset(portal_token)
            request_id_var.reset(token)


def portal_of_path(request: Request) -> int | None:
    """The portal id the route's path names (None for none), on every log line of the request."""
    portal_id = parse_id(request.path_params["portal_id"])
    portal_id_var.set(portal_id)
    return portal_id
