"""Run 7: tenant isolation. Ciphertexts moved between portals and fields never decrypt, and
one portal's secret, id or session never works against another portal.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from dataclasses import dataclass
from pathlib import Path

import httpx
import sqlalchemy as sa
from sqlmodel import col

from app import db
from app.crypto import TokenCipher
from app.errors import CryptoError
from app.models import InboxEvent, OAuthToken, Portal, ReceptionistSecret
from app.portals import PORTAL_CACHE_SECONDS
from app.vault import (
    access_token_context,
    payload_context,
    receptionist_secret_context,
    refresh_token_context,
)
from reliability.crash import wait_drained
from reliability.report import RunResult, say
from reliability.stack import Postgres, Stack, running_stack
from reliability.traffic import DeliveryLog, deliver, deliver_all, plan_events, signed_headers
from reliability.verify import inbox_rows

PORTALS = [7001, 7002, 7003, 7004, 7005, 7006]


@dataclass(frozen=True)
class Slot:
    """One stored ciphertext and the context it was sealed under."""

    label: str
    ciphertext: bytes
    context: str


async def stored_slots(database_url: str) -> list[Slot]:
    engine = db.create_engine(database_url, poolclass=sa.NullPool)
    slots = []
    try:
        async with db.session_factory(engine)() as session:
            for token in (await session.execute(sa.select(OAuthToken))).scalars():
                pid = token.portal_id
                slots.append(
                    Slot(f"access/{pid}", token.access_token_ct, access_token_context(pid))
                )
                slots.append(
                    Slot(f"refresh/{pid}", token.refresh_token_ct, refresh_token_context(pid))
                )
            for secret in (await session.execute(sa.select(ReceptionistSecret))).scalars():
                pid = secret.portal_id
                slots.append(
                    Slot(
                        f"secret/{pid}/{secret.id}",
                        secret.secret_ct,
                        receptionist_secret_context(pid),
                    )
                )
            for event in (await session.execute(sa.select(InboxEvent))).scalars():
                if event.payload_ct is not None:
                    context = payload_context(event.portal_id, event.idempotency_hash)
                    slots.append(
                        Slot(f"payload/{event.portal_id}/{event.id}", event.payload_ct, context)
                    )
    finally:
        await engine.dispose()
    return slots


def swap_decrypts(
    cipher: TokenCipher, slots: list[Slot], swaps: int, rng: random.Random
) -> tuple[int, int]:
    """(swaps tried, swaps that decrypted): each puts one slot's ciphertext in another's place."""
    decrypted = 0
    tried = 0
    while tried < swaps:
        source, target = rng.sample(slots, 2)
        if source.context == target.context:
            continue
        tried += 1
        try:
            cipher.decrypt(source.ciphertext, context=target.context)
        except CryptoError:
            continue
        decrypted += 1
    return tried, decrypted


async def swap_column(database_url: str, model: type, column: str, first: int, second: int) -> None:
    """Exchange one column's ciphertexts between two portals' rows, in the database itself."""
    engine = db.create_engine(database_url, poolclass=sa.NullPool)
    key = col(model.portal_id)  # type: ignore[attr-defined]
    try:
        async with engine.begin() as connection:
            values = {}
            for pid in (first, second):
                row = await connection.execute(
                    sa.select(getattr(model, column)).where(key == pid).limit(1)
                )
                values[pid] = row.scalar_one()
            for pid, other in ((first, second), (second, first)):
                await connection.execute(
                    sa.update(model).where(key == pid).values({column: values[other]})
                )
    finally:
        await engine.dispose()


async def cross_portal_answers(stack: Stack) -> tuple[int, int, list[str]]:
    """Each portal's secret (bearer and signature) sent to every other portal's webhook."""
    tried = 0
    wrong: list[str] = []
    async with httpx.AsyncClient(base_url=stack.web_url, timeout=15) as client:
        for owner, target in itertools.permutations(PORTALS, 2):
            secret = stack.installed[owner].secret
            event = plan_events([target], 1, rng=random.Random(owner * target), prefix=f"x{owner}")[
                0
            ]
            path = f"/webhooks/portals/{target}/receptionist"
            for headers in (
                signed_headers(secret, event.event_id, event.body),
                {"authorization": f"Bearer {secret}", "content-type": "application/json"},
            ):
                tried += 1
                status = (await client.post(path, content=event.body, headers=headers)).status_code
                if status != 401:
                    wrong.append(f"{owner}'s secret on {target}: {status}")
    return tried, len(wrong), wrong[:5]


async def session_against_admin(stack: Stack) -> list[str]:
    """A portal's settings-session cookie must open nothing of the operator console."""
    wrong = []
    cookie = stack.installed[PORTALS[0]].session_cookie
    other = PORTALS[1]
    async with httpx.AsyncClient(
        base_url=stack.web_url, timeout=15, cookies={"hubline_portal": cookie}
    ) as client:
        api = await client.get("/admin/api/portals")
        if api.status_code != 401:
            wrong.append(f"/admin/api/portals with a portal session: {api.status_code}")
        action = await client.post(f"/admin/portals/{other}/disconnect", data={})
        if action.is_success:
            wrong.append(f"disconnect of {other} with a portal session: {action.status_code}")
    return wrong


async def run_isolation(
    postgres: Postgres, log_dir: Path, *, seed: int = 1, swaps: int = 1000
) -> RunResult:
    result = RunResult(
        7, "tenant isolation", f"{swaps} ciphertext swaps; secrets, ids, sessions across portals"
    )
    rng = random.Random(seed)
    async with running_stack(postgres, log_dir, PORTALS) as stack:
        await stack.install_all()
        stack.start_worker("hubline")
        planned = plan_events(PORTALS, 60, rng=rng, prefix="iso")
        log = DeliveryLog()
        await deliver_all(
            stack.web_url, {p: i.secret for p, i in stack.installed.items()}, planned, log
        )
        await wait_drained(stack.database_url, timeout=180, source=None)
        cipher = TokenCipher.from_setting(stack.key)
        slots = await stored_slots(stack.database_url)
        tried, decrypted = swap_decrypts(cipher, slots, swaps, rng)
        say(f"{tried} swaps over {len(slots)} stored ciphertexts: {decrypted} decrypted")
        cross_tried, cross_wrong, cross_examples = await cross_portal_answers(stack)
        session_wrong = await session_against_admin(stack)

        # Swapped secrets in the database itself: neither portal's secret may work on either.
        a, b = PORTALS[2], PORTALS[3]
        await swap_column(stack.database_url, ReceptionistSecret, "secret_ct", a, b)
        # The web process keeps decrypted secrets for a few seconds (it read them before
        # the swap, when they were genuine): what matters is what it does once it reads
        # the swapped rows.
        await asyncio.sleep(PORTAL_CACHE_SECONDS + 1.0)
        swapped_answers = []
        async with httpx.AsyncClient(base_url=stack.web_url, timeout=15) as client:
            for target, owner in itertools.product((a, b), repeat=2):
                event = plan_events([target], 1, rng=rng, prefix=f"swapped-{owner}")[0]
                swapped_answers.append(
                    await deliver(client, stack.installed[owner].secret, event, log)
                )
        await swap_column(stack.database_url, ReceptionistSecret, "secret_ct", a, b)

        # Swapped tokens: an event of one portal must never go out with the other's token.
        c, d = PORTALS[4], PORTALS[5]
        await swap_column(stack.database_url, OAuthToken, "access_token_ct", c, d)
        await swap_column(stack.database_url, OAuthToken, "refresh_token_ct", c, d)
        before = await stack.sandbox_get("/_sandbox/requests", limit=10**6)
        seen_before = len(before["requests"])
        probe = plan_events([c], 1, rng=rng, prefix="swapped-token")[0]
        async with httpx.AsyncClient(base_url=stack.web_url, timeout=15) as client:
            await deliver(client, stack.installed[c].secret, probe, log)
        await wait_drained(stack.database_url, timeout=60, source="receptionist")
        await asyncio.sleep(1.0)
        after = await stack.sandbox_get("/_sandbox/requests", limit=10**6)
        new_requests = after["requests"][seen_before:]
        wrong_token_calls = [r for r in new_requests if r["portal_id"] in (c, d)]
        rows = await inbox_rows(stack.database_url)
        probe_rows = [r for r in rows if r.portal_id == c and r.status == "failed"]
        engine = db.create_engine(stack.database_url, poolclass=sa.NullPool)
        async with engine.connect() as connection:
            found = await connection.execute(sa.select(col(Portal.portal_id), col(Portal.status)))
            statuses: dict[int, str] = {row[0]: row[1] for row in found}
        await engine.dispose()
    result.sent = tried + cross_tried + len(swapped_answers)
    result.details = {
        "ciphertexts": len(slots),
        "swaps": tried,
        "swaps_decrypted": decrypted,
        "cross_portal_requests": cross_tried,
        "cross_portal_accepted": cross_wrong,
        "cross_examples": cross_examples,
        "session_problems": session_wrong,
        "swapped_secret_answers": swapped_answers,
        "delivery_errors": log.error_types,
        "calls_with_swapped_tokens": len(wrong_token_calls),
        "swapped_token_event_failed_visibly": bool(probe_rows),
        "portal_statuses": sorted(set(statuses.values())),
    }
    result.check(f"{swaps} ciphertext swaps all fail to decrypt", tried == swaps and decrypted == 0)
    result.check("another portal's secret refused (401) on every route", cross_wrong == 0)
    result.check("a portal session opens nothing of the console", not session_wrong)
    result.check(
        "swapped secret rows: every delivery refused, none a 5xx",
        all(400 <= s < 500 for s in swapped_answers),
    )
    result.check("swapped token rows: no HubSpot call made with them", not wrong_token_calls)
    result.check("the swapped-token event failed visibly", bool(probe_rows))
    result.lost = 0
    return result
