"""The realistic receptionist traffic every HubSpot-facing measurement uses.

Issue 9's mix: 60% of events come from new callers and 40% from returning ones, 10%
are texts (the rest calls), and phone numbers arrive in mixed formats. Half of the
returning callers are contacts the portal had before the app was installed (seeded
into the CRM first, stored in yet another format, a fifth of them as `mobilephone`);
the other half called earlier in the same stream. Everything is derived from a seed,
so Hubline and the baseline see the same kind of traffic run after run.

Campaigns are left out by default, as the issue's mix leaves them out: where a portal
granted marketing events, Hubline spends one more request per campaign per batch on
attendance, which the baseline (like the guides) does not do at all.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from standardwebhooks.webhooks import Webhook

NEW_SHARE = 0.60
TEXT_SHARE = 0.10
# Of the returning callers, the share who were already contacts before the install.
PRE_EXISTING_SHARE = 0.5
EMAIL_SHARE = 0.3

AREA_CODES = ("415", "212", "312", "617", "206", "303", "512", "702", "919", "503")
FIRST_NAMES = ("Ada", "Grace", "Alan", "Katherine", "Edsger", "Barbara", "Dennis", "Frances")
LAST_NAMES = ("Lovelace", "Hopper", "Turing", "Johnson", "Dijkstra", "Liskov", "Ritchie", "Allen")
OUTCOMES = ("Appointment Booked", "Message Taken", "Question Answered", "Transferred")
CAMPAIGNS = ("google-ads-spring", "radio-fall")


def phone_in_style(digits: str, style: int) -> str:
    """A 10-digit US number written the way people and platforms write it."""
    area, exchange, line = digits[:3], digits[3:6], digits[6:]
    styles = (
        f"+1 {area} {exchange} {line}",
        f"({area}) {exchange}-{line}",
        f"{area}.{exchange}.{line}",
        f"{area}{exchange}{line}",
        f"+1{area}{exchange}{line}",
        f"1-{area}-{exchange}-{line}",
    )
    return styles[style % len(styles)]


@dataclass
class Caller:
    name: str
    digits: str  # the national number, 10 digits
    email: str | None


@dataclass
class Workload:
    """Events to send, the contacts to seed before the install, and what the CRM must end with."""

    events: list[dict[str, Any]]
    seed_contacts: list[dict[str, str]]
    new_callers: int
    calls: int
    texts: int
    returning_events: int = 0
    # Per event: whether its caller is new (the event creates a contact).
    new_caller_flags: list[bool] = field(default_factory=list)

    @property
    def expected_contacts(self) -> int:
        return len(self.seed_contacts) + self.new_callers

    def prefix(self, count: int) -> Workload:
        """The first `count` events (what a time-boxed delivery got through), same seeds."""
        events = self.events[:count]
        flags = self.new_caller_flags[:count]
        texts = sum(e["type"] == "text.received" for e in events)
        return Workload(
            events=events,
            seed_contacts=self.seed_contacts,
            new_callers=sum(flags),
            calls=len(events) - texts,
            texts=texts,
            returning_events=len(events) - sum(flags),
            new_caller_flags=flags,
        )


def realistic_mix(count: int, *, seed: int, prefix: str, campaign_share: float = 0.0) -> Workload:
    """`count` receptionist events in DESIGN.md's nested form, with unique ids."""
    rng = random.Random(seed)
    used_digits: set[str] = set()

    def new_caller(number: int) -> Caller:
        while True:
            digits = (
                rng.choice(AREA_CODES) + str(rng.randint(200, 999)) + f"{rng.randrange(10**4):04d}"
            )
            if digits not in used_digits:
                used_digits.add(digits)
                break
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        email = f"{prefix}.{number}@example.com" if rng.random() < EMAIL_SHARE else None
        return Caller(f"{first} {last}", digits, email)

    returning_target = count - round(count * NEW_SHARE)
    # Seeded contacts are fewer than the events that reach them: some call more than once.
    pre_existing = [
        new_caller(n) for n in range(max(1, round(returning_target * PRE_EXISTING_SHARE * 0.75)))
    ]
    seen: list[Caller] = []
    events: list[dict[str, Any]] = []
    started = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
    new_count = calls = texts = returning = 0
    flags: list[bool] = []
    for index in range(count):
        is_new = rng.random() < NEW_SHARE or (not seen and not pre_existing)
        flags.append(is_new)
        if is_new:
            caller = new_caller(len(pre_existing) + index)
            seen.append(caller)
            new_count += 1
        else:
            returning += 1
            pool = pre_existing if (rng.random() < PRE_EXISTING_SHARE or not seen) else seen
            caller = rng.choice(pool)
        is_text = rng.random() < TEXT_SHARE
        texts += is_text
        calls += not is_text
        event: dict[str, Any] = {
            "id": f"evt_{prefix}_{index:06d}",
            "type": "text.received" if is_text else "call.completed",
            "occurred_at": (started + timedelta(seconds=index)).isoformat().replace("+00:00", "Z"),
            "caller": {
                "name": caller.name,
                "phone": phone_in_style(caller.digits, rng.randrange(6)),
            },
            "summary": "Asked about opening hours and booked a check-up"
            if not is_text
            else "Texted to move an appointment to next week",
            "lead_score": rng.randint(10, 99),
            "follow_up_required": rng.random() < 0.3,
        }
        if caller.email:
            event["caller"]["email"] = caller.email
        if not is_text:
            outcome = rng.choice(OUTCOMES)
            event |= {
                "duration_seconds": rng.randint(30, 900),
                "outcome": outcome,
                "appointment_booked": outcome == "Appointment Booked",
            }
        if rng.random() < campaign_share:
            event["campaign_id"] = rng.choice(CAMPAIGNS)
        events.append(event)
    seed_contacts = []
    for number, caller in enumerate(pre_existing):
        first, _, last = caller.name.rpartition(" ")
        # Stored as a person typed it; a fifth of them only as a mobile number.
        stored = phone_in_style(caller.digits, 1 + number % 5)
        properties = {"firstname": first, "lastname": last}
        properties["mobilephone" if number % 5 == 0 else "phone"] = stored
        if caller.email:
            properties["email"] = caller.email
        seed_contacts.append(properties)
    return Workload(
        events=events,
        seed_contacts=seed_contacts,
        new_callers=new_count,
        calls=calls,
        texts=texts,
        returning_events=returning,
        new_caller_flags=flags,
    )


def write_signed_requests(
    events: list[dict[str, Any]], secret: str, path: Path, *, now: datetime | None = None
) -> Path:
    """One line per event: webhook-id, webhook-timestamp, webhook-signature, body (tab-separated).

    Signing happens here, before any clock starts, so the load generator only sends.
    """
    signer = Webhook(secret)
    when = now or datetime.now(UTC)
    with path.open("w") as out:
        for event in events:
            body = json.dumps(event, separators=(",", ":"))
            signature = signer.sign(event["id"], when, body)
            out.write(f"{event['id']}\t{int(when.timestamp())}\t{signature}\t{body}\n")
    return path
