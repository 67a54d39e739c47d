"""The baseline: the integration a HubSpot guide typically shows, written carefully and fairly.

For each receptionist event, one at a time:
1. search the contact by phone (`POST /crm/v3/objects/contacts/search`): one request
   whose filter groups cover the calculated digits-only copies of `phone` and
   `mobilephone` (so a number typed in another format still matches) and the email;
2. create the contact, or PATCH it (filling name, phone and email only where empty,
   from the properties the search already returned: no extra read);
3. create the call (a note for a text) with its association to the contact.

It gets what Hubline gets: the same httpx client settings (`app.main.HTTP_TIMEOUT`, no
redirects), the same sandbox, tokens from the same OAuth flow, refreshed shortly
before they expire and once after a 401. On 429 it waits as HubSpot asks (Retry-After
when sent, else capped exponential backoff with jitter from 1 s) and retries; when the
X-HubSpot-RateLimit-Remaining header reaches 0 it pauses for one request's share of the
interval before sending again, so it does not walk into a 429 it was warned about.
Search answers carry no such headers, so it keeps its own count of HubSpot's documented
5 searches per second (without that it spends a second backing off after every
search 429 and runs at about 60% of the speed measured with it).
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import httpx
import phonenumbers

from app.main import HTTP_TIMEOUT

SEARCH_PATH = "/crm/v3/objects/contacts/search"
CONTACTS_PATH = "/crm/v3/objects/contacts"
CALL_TO_CONTACT = 194
NOTE_TO_CONTACT = 202
REFRESH_SKEW_SECONDS = 300.0
MAX_ATTEMPTS = 8
SEARCHES_PER_SECOND = 5  # HubSpot's documented search limit per portal

# The contact properties DESIGN.md defines, created once before the run like a guide's
# "create your custom properties" step (not counted: Hubline's provisioning is not either).
PROPERTY_GROUP = {"name": "ai_receptionist", "label": "AI receptionist"}
OUTCOME_OPTIONS = (
    "appointment_booked",
    "message_taken",
    "question_answered",
    "transferred",
    "spam",
    "other",
)
PROPERTIES: list[dict[str, Any]] = [
    {"name": "ai_call_summary", "type": "string", "fieldType": "textarea"},
    {
        "name": "call_outcome",
        "type": "enumeration",
        "fieldType": "select",
        "options": [
            {"label": value.replace("_", " ").title(), "value": value, "displayOrder": order}
            for order, value in enumerate(OUTCOME_OPTIONS)
        ],
    },
    {
        "name": "lead_source",
        "type": "enumeration",
        "fieldType": "select",
        "options": [{"label": "AI Receptionist", "value": "ai_receptionist", "displayOrder": 0}],
    },
    {"name": "ai_lead_score", "type": "number", "fieldType": "number"},
    {"name": "follow_up_required", "type": "bool", "fieldType": "booleancheckbox"},
    {"name": "appointment_booked", "type": "bool", "fieldType": "booleancheckbox"},
    {"name": "marketing_campaign_id", "type": "string", "fieldType": "text"},
]
BOOL_OPTIONS = [
    {"label": "Yes", "value": "true", "displayOrder": 0},
    {"label": "No", "value": "false", "displayOrder": 1},
]
FILLED_ONLY_IF_EMPTY = ("firstname", "lastname", "email", "phone")


class BaselineError(Exception):
    """HubSpot refused a call for good (not a rate limit the baseline can wait out)."""


@dataclass
class Tokens:
    """The portal's tokens, refreshed with the refresh grant shortly before they expire."""

    api_url: str
    client_id: str
    client_secret: str
    access_token: str
    refresh_token: str
    expires_at: float  # time.monotonic()

    @classmethod
    def from_answer(
        cls, answer: dict[str, Any], *, api_url: str, client_id: str, client_secret: str
    ) -> Tokens:
        return cls(
            api_url,
            client_id,
            client_secret,
            answer["access_token"],
            answer["refresh_token"],
            time.monotonic() + float(answer["expires_in"]),
        )

    async def current(self, http: httpx.AsyncClient) -> str:
        if self.expires_at - time.monotonic() <= REFRESH_SKEW_SECONDS:
            await self.refresh(http)
        return self.access_token

    async def refresh(self, http: httpx.AsyncClient) -> None:
        answer = await http.post(
            f"{self.api_url}/oauth/v3/token",
            data={
                "grant_type": "refresh_token",
                "client_id": self.client_id,
                "client_secret": self.client_secret,
                "refresh_token": self.refresh_token,
            },
        )
        answer.raise_for_status()
        body = answer.json()
        self.access_token = body["access_token"]
        self.refresh_token = body.get("refresh_token") or self.refresh_token
        self.expires_at = time.monotonic() + float(body["expires_in"])


@dataclass
class BaselineRun:
    attempted: int = 0
    synced: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    rate_limited: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def events_per_second(self) -> float:
        return self.synced / self.elapsed_s if self.elapsed_s else 0.0


def new_http_client() -> httpx.AsyncClient:
    """The HTTP client settings Hubline's own client uses (app.main.open_services)."""
    return httpx.AsyncClient(timeout=HTTP_TIMEOUT, follow_redirects=False)


def national_digits(raw: str | None, region: str) -> str | None:
    """The national number's digits, as HubSpot's calculated phone properties hold them."""
    if not raw:
        return None
    try:
        number = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException:
        return None
    return str(number.national_number) if phonenumbers.is_possible_number(number) else None


def outcome_value(label: str | None) -> str | None:
    if not label:
        return None
    value = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
    return value if value in OUTCOME_OPTIONS else "other"


class GuideIntegration:
    """One event at a time: search, create or patch, create the engagement."""

    def __init__(
        self, http: httpx.AsyncClient, api_url: str, tokens: Tokens, *, region: str = "US"
    ) -> None:
        self.http = http
        self.api_url = api_url
        self.tokens = tokens
        self.region = region
        self.rate_limited = 0
        self._searches: deque[float] = deque()

    async def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """One API call, waiting out 429s and 5xx, refreshing once after a 401."""
        refreshed = False
        for attempt in range(1, MAX_ATTEMPTS + 1):
            if path == SEARCH_PATH:
                await self._pace_search()
            token = await self.tokens.current(self.http)
            response = await self.http.request(
                method,
                self.api_url + path,
                json=body,
                headers={"Authorization": f"Bearer {token}"},
            )
            if path == SEARCH_PATH:
                # Counted when the answer came: HubSpot counted it no later than that.
                self._searches.append(time.monotonic())
            if response.status_code == 401 and not refreshed:
                refreshed = True
                await self.tokens.refresh(self.http)
                continue
            if response.status_code == 429 or response.status_code >= 500:
                self.rate_limited += response.status_code == 429
                await asyncio.sleep(self._wait_after_refusal(response, attempt))
                continue
            if response.is_error:
                raise BaselineError(
                    f"{method} {path}: {response.status_code} {response.text[:200]}"
                )
            await self._respect_remaining(response)
            result: dict[str, Any] = response.json() if response.content else {}
            return result
        raise BaselineError(f"{method} {path}: gave up after {MAX_ATTEMPTS} attempts")

    async def _pace_search(self) -> None:
        while self._searches and self._searches[0] <= time.monotonic() - 1.0:
            self._searches.popleft()
        if len(self._searches) >= SEARCHES_PER_SECOND:
            await asyncio.sleep(self._searches[0] + 1.0 - time.monotonic())

    @staticmethod
    def _wait_after_refusal(response: httpx.Response, attempt: int) -> float:
        retry_after = response.headers.get("Retry-After")
        if retry_after is not None:
            try:
                return float(retry_after)
            except ValueError:
                pass
        ceiling = min(10.0, 1.0 * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)

    @staticmethod
    async def _respect_remaining(response: httpx.Response) -> None:
        headers = response.headers
        try:
            remaining = int(headers["X-HubSpot-RateLimit-Remaining"])
            maximum = int(headers["X-HubSpot-RateLimit-Max"])
            interval = int(headers["X-HubSpot-RateLimit-Interval-Milliseconds"]) / 1000
        except (KeyError, ValueError):
            return
        if remaining <= 0 and maximum > 0:
            await asyncio.sleep(interval / maximum)

    async def provision(self) -> None:
        """Create the property group and properties once (a setup step, not per event)."""
        await self.call("POST", "/crm/v3/properties/contacts/groups", PROPERTY_GROUP)
        for definition in PROPERTIES:
            body = {
                "label": definition["name"].replace("_", " ").title(),
                "groupName": PROPERTY_GROUP["name"],
                **definition,
            }
            if definition["type"] == "bool":
                body["options"] = BOOL_OPTIONS
            await self.call("POST", "/crm/v3/properties/contacts", body)

    async def find_contact(self, phone: str | None, email: str | None) -> dict[str, Any] | None:
        groups = []
        digits = national_digits(phone, self.region)
        if digits:
            for name in (
                "hs_searchable_calculated_phone_number",
                "hs_searchable_calculated_mobile_number",
            ):
                groups.append(
                    {"filters": [{"propertyName": name, "operator": "EQ", "value": digits}]}
                )
        if email:
            groups.append(
                {"filters": [{"propertyName": "email", "operator": "EQ", "value": email}]}
            )
        if not groups:
            return None
        answer = await self.call(
            "POST",
            SEARCH_PATH,
            {"filterGroups": groups, "properties": list(FILLED_ONLY_IF_EMPTY), "limit": 1},
        )
        results = answer.get("results") or []
        return results[0] if results else None

    async def sync(self, event: dict[str, Any]) -> None:
        caller = event.get("caller") or {}
        phone, email = caller.get("phone"), caller.get("email")
        first, _, last = (caller.get("name") or "").strip().rpartition(" ")
        if not first:
            first, last = last, ""
        ai = {
            "ai_call_summary": event.get("summary") or "",
            "ai_lead_score": str(event.get("lead_score", "")),
            "follow_up_required": str(bool(event.get("follow_up_required"))).lower(),
            "appointment_booked": str(bool(event.get("appointment_booked"))).lower(),
            "marketing_campaign_id": event.get("campaign_id") or "",
        }
        outcome = outcome_value(event.get("outcome"))
        if outcome:
            ai["call_outcome"] = outcome
        identity = {
            "firstname": first,
            "lastname": last,
            "phone": phone or "",
            "email": email or "",
        }
        found = await self.find_contact(phone, email)
        if found is None:
            properties = {k: v for k, v in identity.items() if v}
            properties |= {"lead_source": "ai_receptionist", **ai}
            created = await self.call("POST", CONTACTS_PATH, {"properties": properties})
            contact_id = str(created["id"])
        else:
            contact_id = str(found["id"])
            existing = found.get("properties") or {}
            fill = {k: v for k, v in identity.items() if v and not existing.get(k)}
            await self.call(
                "PATCH", f"{CONTACTS_PATH}/{contact_id}", {"properties": {**fill, **ai}}
            )
        await self._engagement(event, contact_id, phone)

    async def _engagement(self, event: dict[str, Any], contact_id: str, phone: str | None) -> None:
        timestamp = event["occurred_at"]
        if event["type"] == "call.completed":
            properties = {
                "hs_timestamp": timestamp,
                "hs_call_title": "AI receptionist call",
                "hs_call_body": event.get("summary") or "",
                "hs_call_duration": str(int(float(event.get("duration_seconds") or 0) * 1000)),
                "hs_call_direction": "INBOUND",
                "hs_call_status": "COMPLETED",
                "hs_call_from_number": phone or "",
            }
            path, association = "/crm/v3/objects/calls", CALL_TO_CONTACT
        else:
            kind = "text" if event["type"] == "text.received" else "chat"
            properties = {
                "hs_timestamp": timestamp,
                "hs_note_body": f"AI receptionist {kind}\n\n{event.get('summary') or ''}",
            }
            path, association = "/crm/v3/objects/notes", NOTE_TO_CONTACT
        await self.call(
            "POST",
            path,
            {
                "properties": properties,
                "associations": [
                    {
                        "to": {"id": contact_id},
                        "types": [
                            {
                                "associationCategory": "HUBSPOT_DEFINED",
                                "associationTypeId": association,
                            }
                        ],
                    }
                ],
            },
        )

    async def run(
        self, events: list[dict[str, Any]], *, deadline: float | None = None
    ) -> BaselineRun:
        """Sync the events in order; stop early at `deadline` (time.monotonic())."""
        result = BaselineRun()
        started = time.monotonic()
        for event in events:
            if deadline is not None and time.monotonic() >= deadline:
                break
            result.attempted += 1
            try:
                await self.sync(event)
            except (BaselineError, httpx.HTTPError) as error:
                result.failed += 1
                result.errors.append(str(error)[:300])
            else:
                result.synced += 1
        result.elapsed_s = time.monotonic() - started
        result.rate_limited = self.rate_limited
        return result
