"""Run 8: hostile input over every public route, and replays of signed deliveries.

Hypothesis generates requests from `app.main.all_routes()`: random methods, paths and
path parameters, headers (garbage, forged and valid signatures, the admin token,
cookies), bodies (bytes, JSON, deep nesting, invalid UTF-8, oversized, chunked). No
answer may be a 5xx, and nothing may be stored except what was answered "accepted".
Then 1,000 replays of one signed delivery store one event, and a replay one second
past the signature window is a 401.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from starlette.routing import Route

from app import db
from app.sandbox.webhooks import signature_v3
from reliability.report import RunResult, say
from reliability.stack import ADMIN_TOKEN, CLIENT_SECRET, Postgres, Stack, running_stack
from reliability.traffic import plan_events, signed_headers

PORTAL = 8001
OTHER_PORTAL = 8002
MAX_BODY = 1024 * 1024
# Standard Webhooks and HubSpot both accept timestamps up to five minutes away.
WINDOW_SECONDS = 300


@dataclass
class Outcome:
    answers: Counter[int] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    unsendable: int = 0

    def record(self, method: str, path: str, status: int, note: str = "") -> None:
        self.answers[status] += 1
        if (status >= 500 or status == 0) and len(self.server_errors) < 8:
            self.server_errors.append(f"{method} {path[:80]} → {status} {note}"[:200])


def route_templates() -> list[str]:
    from app.main import all_routes

    paths = [route.path for route in all_routes() if isinstance(route, Route)]
    return sorted(set(paths))


PARAM = re.compile(r"\{([a-z_]+)(?::[a-z]+)?\}")
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=120)
path_value = st.one_of(
    st.just(str(PORTAL)),
    st.just(str(OTHER_PORTAL)),
    st.integers(-(10**20), 10**20).map(str),
    st.sampled_from(["retry", "rotate-secret", "provision", "disconnect", "..", "%2e%2e", "%00"]),
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=40).map(lambda s: quote(s, safe="")),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=30,
)


def event_like(draw: Any) -> dict[str, Any]:
    """A receptionist event with a few fields replaced by anything."""
    base: dict[str, Any] = json.loads(
        plan_events([PORTAL], 1, rng=random.Random(draw(st.integers(0, 10**6))), prefix="fz")[
            0
        ].body
    )
    keys = [
        "id",
        "type",
        "occurred_at",
        "caller",
        "summary",
        "duration_seconds",
        "lead_score",
        "call_id",
        "caller_phone",
        "caller_email",
        "appointment_booked",
        "transcript",
    ]
    for key in draw(st.lists(st.sampled_from(keys), max_size=4)):
        if draw(st.booleans()):
            base.pop(key, None)
        else:
            base[key] = draw(json_values)
    return base


@st.composite
def hubspot_like(draw: Any) -> dict[str, Any]:
    """A HubSpot webhook event with a few fields replaced by anything."""
    event: dict[str, Any] = {
        "eventId": draw(st.integers(1, 10**6)),
        "subscriptionId": 500001,
        "portalId": PORTAL,
        "appId": 424242,
        "occurredAt": int(time.time() * 1000),
        "subscriptionType": "contact.creation",
        "attemptNumber": 0,
        "objectId": draw(st.integers(1, 10**9)),
    }
    for key in draw(st.lists(st.sampled_from(sorted(event)), max_size=3)):
        event[key] = draw(json_values)
    return event


@st.composite
def bodies(draw: Any) -> bytes | None:
    kind = draw(
        st.sampled_from(
            ["none", "bytes", "json", "event", "event", "hubspot", "deep", "big", "utf8", "form"]
        )
    )
    if kind == "none":
        return None
    if kind == "bytes":
        raw: bytes = draw(st.binary(max_size=400))
        return raw
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "event":
        return json.dumps(event_like(draw)).encode()
    if kind == "hubspot":
        return json.dumps(draw(st.lists(hubspot_like(), max_size=3))).encode()
    if kind == "deep":
        depth: int = draw(st.sampled_from([100, 1000, 50_000, 200_000]))
        opener: str = draw(st.sampled_from(["[", '{"a":']))
        closer = "]" if opener == "[" else "}"
        return (opener * depth + "1" + closer * depth).encode()
    if kind == "big":
        size: int = draw(st.sampled_from([MAX_BODY - 1, MAX_BODY, MAX_BODY + 1, 3 * MAX_BODY]))
        return b'{"summary":"' + b"x" * max(0, size - 14) + b'"}'
    if kind == "utf8":
        return b'{"id":"\xff\xfe\xc0\x80","type":"call.completed"}'
    form: dict[str, str] = draw(st.dictionaries(header_text, header_text, max_size=4))
    return urlencode(form).encode()


@dataclass(frozen=True)
class HostileRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes | None
    chunked: bool
    auth: str


@st.composite
def hostile_requests(draw: Any, templates: list[str]) -> HostileRequest:
    # Half the requests aim at the webhook routes with a plausible method and portal, so
    # bodies and signatures get past the first checks often enough to test the later ones.
    focus = draw(st.sampled_from(["receptionist", "receptionist", "hubspot", "any", "any"]))
    if focus == "receptionist":
        portal = draw(st.sampled_from([str(PORTAL), str(PORTAL), str(OTHER_PORTAL)]) | path_value)
        path = f"/webhooks/portals/{portal}/receptionist"
        auths = ["portal-signature", "portal-signature", "portal-bearer", "stale", "garbage"]
    elif focus == "hubspot":
        path = "/webhooks/hubspot"
        auths = ["hubspot", "hubspot", "garbage", "portal-bearer"]
    else:
        template = draw(
            st.sampled_from([*templates, "/{x}", "/webhooks/portals/{x}/{y}", "/admin/{x}"])
        )
        path = PARAM.sub(lambda _m: draw(path_value), template)
        if draw(st.integers(0, 9)) == 0:
            path += "/" + draw(path_value)
        auths = ["garbage", "garbage", "portal-signature", "portal-bearer", "hubspot", "admin"]
    methods = ["GET", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    method = "POST" if draw(st.integers(0, 3)) else draw(st.sampled_from(methods))
    query = ""
    if draw(st.booleans()):
        names = (
            st.sampled_from(["code", "state", "error", "returnUrl", "portal_id", "x"]) | header_text
        )
        query = urlencode(draw(st.dictionaries(names, header_text, max_size=4)))
    names = st.sampled_from(
        [
            "authorization",
            "content-type",
            "webhook-id",
            "webhook-timestamp",
            "webhook-signature",
            "x-hubspot-signature-v3",
            "x-hubspot-request-timestamp",
            "cookie",
            "accept",
            "origin",
            "x-request-id",
            "x-forwarded-proto",
            "content-encoding",
        ]
    )
    headers = draw(st.dictionaries(names, header_text, max_size=5))
    return HostileRequest(
        method=method,
        path=path,
        query=query,
        headers=headers,
        body=draw(bodies()),
        chunked=draw(st.integers(0, 5)) == 0,
        auth=draw(st.sampled_from(auths)),
    )


def authenticate(request: HostileRequest, stack: Stack, secret: str) -> dict[str, str]:
    """The request's headers, with the authentication its `auth` asks for."""
    headers = dict(request.headers)
    body = request.body or b""
    if request.auth in ("portal-signature", "stale"):
        at = time.time() - (WINDOW_SECONDS + 1 if request.auth == "stale" else 0)
        try:
            headers |= signed_headers(secret, "fuzz-" + str(random.random()), body, at=at)
        except UnicodeDecodeError:  # the signer wants text; sign garbage as latin-1 text
            headers["webhook-signature"] = "v1,invalid"
    elif request.auth == "portal-bearer":
        headers["authorization"] = f"Bearer {secret}"
    elif request.auth == "admin":
        headers["authorization"] = f"Bearer {ADMIN_TOKEN}"
    elif request.auth == "hubspot":
        stamp = int(time.time() * 1000)
        url = stack.web_url + request.path + (f"?{request.query}" if request.query else "")
        headers["x-hubspot-signature-v3"] = signature_v3(
            CLIENT_SECRET, request.method, url, body, stamp
        )
        headers["x-hubspot-request-timestamp"] = str(stamp)
    return headers


def fuzz(stack: Stack, secret: str, examples: int, seed: int) -> tuple[Outcome, int]:
    """Send `examples` generated requests; (outcome, events the answers say were stored)."""
    outcome = Outcome()
    stored_by_answers = 0
    client = httpx.Client(base_url=stack.web_url, timeout=30)

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        derandomize=False,
    )
    @given(request=hostile_requests(route_templates()))
    def send(request: HostileRequest) -> None:
        nonlocal stored_by_answers
        headers = authenticate(request, stack, secret)
        url = request.path + (f"?{request.query}" if request.query else "")
        content: bytes | Iterator[bytes] | None = request.body
        if request.chunked and request.body is not None:
            body = request.body
            content = iter([body[i : i + 65536] for i in range(0, len(body), 65536)])
        try:
            response = client.request(request.method, url, headers=headers, content=content)
        except httpx.LocalProtocolError:
            # httpx refused to send it (e.g. a header value HTTP cannot carry): not a request.
            outcome.unsendable += 1
            return
        except httpx.HTTPError as error:
            outcome.record(request.method, request.path, 0, type(error).__name__)
            return
        note = response.text[:80] if response.status_code >= 500 else ""
        outcome.record(request.method, request.path, response.status_code, note)
        if request.path.startswith("/webhooks/") and response.is_success:
            try:
                answer = response.json()
            except ValueError:
                return
            if answer.get("status") == "accepted":
                stored_by_answers += 1
            stored_by_answers += int(answer.get("stored", 0) or 0)

    random.seed(seed)
    try:
        send()
    finally:
        client.close()
    return outcome, stored_by_answers


async def stored_inputs(database_url: str) -> int:
    engine = db.create_engine(database_url, poolclass=sa.NullPool)
    try:
        async with engine.connect() as connection:
            query = sa.text(
                "SELECT count(*) FROM events WHERE source IN ('receptionist', 'hubspot')"
            )
            return int((await connection.execute(query)).scalar_one())
    finally:
        await engine.dispose()


async def replays(stack: Stack, secret: str) -> dict[str, Any]:
    """1,000 replays of one signed receptionist delivery and of one signed HubSpot batch."""
    event = plan_events([PORTAL], 1, rng=random.Random(8), prefix="replayed")[0]
    headers = signed_headers(secret, event.event_id, event.body)
    path = f"/webhooks/portals/{PORTAL}/receptionist"
    hubspot_body = json.dumps(
        [
            {
                "eventId": 77,
                "subscriptionId": 500001,
                "portalId": PORTAL,
                "appId": 424242,
                "occurredAt": int(time.time() * 1000),
                "subscriptionType": "contact.creation",
                "attemptNumber": 0,
                "objectId": 987654,
            }
        ]
    ).encode()
    stamp = int(time.time() * 1000)
    hubspot_headers = {
        "x-hubspot-signature-v3": signature_v3(
            CLIENT_SECRET, "POST", stack.web_url + "/webhooks/hubspot", hubspot_body, stamp
        ),
        "x-hubspot-request-timestamp": str(stamp),
        "content-type": "application/json",
    }
    before = await stored_inputs(stack.database_url)
    limits = httpx.Limits(max_connections=20)
    async with httpx.AsyncClient(base_url=stack.web_url, timeout=30, limits=limits) as client:
        semaphore = asyncio.Semaphore(20)

        async def send(url: str, body: bytes, sent_headers: dict[str, str]) -> int:
            async with semaphore:
                return (await client.post(url, content=body, headers=sent_headers)).status_code

        receptionist = Counter(
            await asyncio.gather(*(send(path, event.body, headers) for _ in range(1000)))
        )
        hubspot = Counter(
            await asyncio.gather(
                *(send("/webhooks/hubspot", hubspot_body, hubspot_headers) for _ in range(1000))
            )
        )
        after_replays = await stored_inputs(stack.database_url)
        stale = signed_headers(secret, "stale-1", event.body, at=time.time() - WINDOW_SECONDS - 1)
        future = signed_headers(secret, "future-1", event.body, at=time.time() + WINDOW_SECONDS + 1)
        stale_answer = (await client.post(path, content=event.body, headers=stale)).status_code
        future_answer = (await client.post(path, content=event.body, headers=future)).status_code
        old_stamp = int((time.time() - WINDOW_SECONDS - 1) * 1000)
        stale_hubspot = {
            **hubspot_headers,
            "x-hubspot-signature-v3": signature_v3(
                CLIENT_SECRET, "POST", stack.web_url + "/webhooks/hubspot", hubspot_body, old_stamp
            ),
            "x-hubspot-request-timestamp": str(old_stamp),
        }
        stale_hubspot_answer = (
            await client.post("/webhooks/hubspot", content=hubspot_body, headers=stale_hubspot)
        ).status_code
    return {
        "receptionist_replay_answers": dict(receptionist),
        "hubspot_replay_answers": dict(hubspot),
        "stored_by_2000_replays": after_replays - before,
        "replay_1s_past_window": stale_answer,
        "replay_1s_ahead_of_window": future_answer,
        "hubspot_replay_1s_past_window": stale_hubspot_answer,
    }


async def run_hostile(
    postgres: Postgres, log_dir: Path, *, examples: int = 1500, seed: int = 1
) -> RunResult:
    result = RunResult(
        8, "hostile input", f"{examples} generated requests over every route; 2×1,000 replays"
    )
    async with running_stack(postgres, log_dir, [PORTAL, OTHER_PORTAL]) as stack:
        await stack.install_all()
        secret = stack.installed[PORTAL].secret
        before = await stored_inputs(stack.database_url)
        outcome, stored_by_answers = await asyncio.to_thread(fuzz, stack, secret, examples, seed)
        stored = await stored_inputs(stack.database_url) - before
        say(f"fuzz: {dict(outcome.answers)}; {stored} stored, answers said {stored_by_answers}")
        replay = await replays(stack, secret)
        web_alive = stack.web is not None and stack.web.alive
    result.sent = sum(outcome.answers.values()) + 2000
    result.duplicated = max(0, replay["stored_by_2000_replays"] - 2)
    result.details = {
        "answers": dict(sorted(outcome.answers.items())),
        "server_errors": outcome.server_errors,
        "not_sendable_by_httpx": outcome.unsendable,
        "stored_from_fuzz": stored,
        "accepted_by_answers": stored_by_answers,
        **replay,
    }
    result.check("no 5xx and no dropped connection", not outcome.server_errors)
    result.check("nothing stored that was not answered accepted", stored == stored_by_answers)
    result.check(
        "1,000 receptionist replays → one stored event, all 2xx",
        set(replay["receptionist_replay_answers"]) <= {200, 202}
        and replay["receptionist_replay_answers"].get(202) == 1,
    )
    result.check(
        "1,000 HubSpot replays → one stored event, all 2xx",
        set(replay["hubspot_replay_answers"]) == {200} and replay["stored_by_2000_replays"] == 2,
    )
    result.check("replay 1 s past the window → 401", replay["replay_1s_past_window"] == 401)
    result.check("replay 1 s ahead of the window → 401", replay["replay_1s_ahead_of_window"] == 401)
    result.check(
        "HubSpot replay 1 s past the window → 401", replay["hubspot_replay_1s_past_window"] == 401
    )
    result.check("hubline serve still up", web_alive)
    return result
