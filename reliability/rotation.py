"""Run 6: `hubline keys rotate` over 10,000 stored secrets, SIGKILLed three times and restarted.

Afterwards every ciphertext must read back with the new key alone, none may remain under
the old key, and the service must work with the old key removed: start, be ready, accept
a portal's signed events, and still recognise a redelivery of an event stored before.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from datetime import timedelta
from pathlib import Path

import httpx
import sqlalchemy as sa
from sqlmodel import col

from app import db
from app.crypto import TokenCipher, generate_key
from app.errors import CryptoError
from app.inbox import NewEvent, idempotency_hashes
from app.models import (
    EventSource,
    InboxEvent,
    OAuthToken,
    Portal,
    ReceptionistSecret,
    utcnow,
)
from app.vault import (
    access_token_context,
    payload_context,
    receptionist_secret_context,
    refresh_token_context,
)
from reliability.report import RunResult, say
from reliability.stack import HUBLINE, Postgres, Processes, Stack, running_stack
from reliability.traffic import DeliveryLog, deliver, plan_events

FIRST_PORTAL = 600_000


async def seed_secrets(database_url: str, cipher: TokenCipher, total: int) -> dict[str, str]:
    """`total` ciphertext rows under the cipher's key; answers plaintext per (table, row key)."""
    portals = total // 4
    expected: dict[str, str] = {}
    now = utcnow()
    portal_rows, token_rows, secret_rows, event_rows = [], [], [], []
    for n in range(portals):
        pid = FIRST_PORTAL + n
        access, refresh, secret = f"access-{pid}", f"refresh-{pid}", f"whsec_secret{pid}"
        portal_rows.append(
            {
                "portal_id": pid,
                "hub_domain": "",
                "status": "active",
                "install_generation": 1,
                "scopes": "",
                "installed_at": now,
                "created_at": now,
                "updated_at": now,
            }
        )
        token_rows.append(
            {
                "portal_id": pid,
                "access_token_ct": cipher.encrypt(access, context=access_token_context(pid)),
                "refresh_token_ct": cipher.encrypt(refresh, context=refresh_token_context(pid)),
                "key_id": cipher.primary_key_id,
                "expires_at": now + timedelta(minutes=30),
                "version": 1,
                "install_generation": 1,
                "updated_at": now,
            }
        )
        expected[f"access:{pid}"] = access
        expected[f"refresh:{pid}"] = refresh
        secret_rows.append(
            {
                "portal_id": pid,
                "secret_ct": cipher.encrypt(secret, context=receptionist_secret_context(pid)),
                "key_id": cipher.primary_key_id,
                "created_at": now,
            }
        )
        expected[f"secret:{pid}"] = secret
        for k in range(2):
            key = f"stored-{pid}-{k}"
            event = NewEvent(pid, EventSource.receptionist, "call.completed", key, now)
            digest = idempotency_hashes(cipher, event)[0]
            payload = json.dumps({"id": key, "summary": f"payload {key}"})
            event_rows.append(
                {
                    "portal_id": pid,
                    "source": "receptionist",
                    "type": "call.completed",
                    "idempotency_hash": digest,
                    "occurred_at": now,
                    "received_at": now,
                    "run_after": now,
                    "payload_ct": cipher.encrypt(payload, context=payload_context(pid, digest)),
                    "key_id": cipher.primary_key_id,
                    "status": "done",
                    "attempts": 1,
                }
            )
            expected[f"event:{pid}:{digest}"] = payload
    engine = db.create_engine(database_url, poolclass=sa.NullPool)
    try:
        async with engine.begin() as connection:
            for model, rows in (
                (Portal, portal_rows),
                (OAuthToken, token_rows),
                (ReceptionistSecret, secret_rows),
                (InboxEvent, event_rows),
            ):
                for start in range(0, len(rows), 1000):
                    await connection.execute(sa.insert(model), rows[start : start + 1000])
    finally:
        await engine.dispose()
    return expected


async def rows_under(database_url: str, key_id: str) -> int:
    engine = db.create_engine(database_url, poolclass=sa.NullPool)
    total = 0
    try:
        async with engine.connect() as connection:
            for column in (
                col(OAuthToken.key_id),
                col(ReceptionistSecret.key_id),
                col(InboxEvent.key_id),
            ):
                query = sa.select(sa.func.count()).where(column == key_id)
                total += int((await connection.execute(query)).scalar_one())
    finally:
        await engine.dispose()
    return total


async def blind_indexes_under(database_url: str, key_id: str) -> int:
    """Idempotency and identity hashes still keyed by `key_id` (they carry it as a prefix)."""
    engine = db.create_engine(database_url, poolclass=sa.NullPool)
    try:
        async with engine.connect() as connection:
            events = await connection.execute(
                sa.text("SELECT count(*) FROM events WHERE idempotency_hash LIKE :p"),
                {"p": f"{key_id}:%"},
            )
            identities = await connection.execute(
                sa.text("SELECT count(*) FROM identity_index WHERE value_hash LIKE :p"),
                {"p": f"{key_id}:%"},
            )
            return int(events.scalar_one()) + int(identities.scalar_one())
    finally:
        await engine.dispose()


async def unreadable(database_url: str, cipher: TokenCipher, expected: dict[str, str]) -> int:
    """Ciphertexts the cipher cannot read back to what was stored."""
    engine = db.create_engine(database_url, poolclass=sa.NullPool)
    bad = 0
    try:
        async with db.session_factory(engine)() as session:
            for token in (await session.execute(sa.select(OAuthToken))).scalars():
                pid = token.portal_id
                for name, ct, context in (
                    ("access", token.access_token_ct, access_token_context(pid)),
                    ("refresh", token.refresh_token_ct, refresh_token_context(pid)),
                ):
                    bad += _reads_as(cipher, ct, context, expected.get(f"{name}:{pid}"))
            for secret in (await session.execute(sa.select(ReceptionistSecret))).scalars():
                pid = secret.portal_id
                context = receptionist_secret_context(pid)
                bad += _reads_as(cipher, secret.secret_ct, context, expected.get(f"secret:{pid}"))
            for event in (await session.execute(sa.select(InboxEvent))).scalars():
                if event.payload_ct is None:
                    continue
                context = payload_context(event.portal_id, event.idempotency_hash)
                want = expected.get(f"event:{event.portal_id}:{event.idempotency_hash}")
                bad += _reads_as(cipher, event.payload_ct, context, want)
    finally:
        await engine.dispose()
    return bad


def _reads_as(cipher: TokenCipher, ciphertext: bytes, context: str, want: str | None) -> int:
    try:
        plain = cipher.decrypt_str(ciphertext, context=context)
    except CryptoError:
        return 1
    return 0 if want is None or plain == want else 1


async def rotate_with_kills(
    stack: Stack, keys: str, kills: int, rng: random.Random, total: int, old_key_id: str
) -> tuple[int, list[int], int]:
    """Run `hubline keys rotate`, SIGKILLing it `kills` times mid-way; (kills, remaining, rc)."""
    processes: Processes = stack.processes
    env = stack.env(TOKEN_ENCRYPTION_KEYS=keys)
    killed = 0
    remaining_at_kill: list[int] = []
    while True:
        proc = processes.start("keys-rotate", [*HUBLINE, "keys", "rotate"], env)
        if killed < kills:
            before = await rows_under(stack.database_url, old_key_id)
            # Kill once it has made real progress, at a random point of what is left.
            target = before - max(1, int(before * rng.uniform(0.1, 0.3)))
            while proc.alive and await rows_under(stack.database_url, old_key_id) > target:
                await asyncio.sleep(0.02)
            if proc.alive:
                processes.kill(proc, signal.SIGKILL)
                killed += 1
                remaining_at_kill.append(await rows_under(stack.database_url, old_key_id))
                say(f"killed the rotation with {remaining_at_kill[-1]}/{total} rows left")
                continue
        while proc.alive:
            await asyncio.sleep(0.1)
        return killed, remaining_at_kill, int(proc.popen.returncode or 0)


async def run_rotation(
    postgres: Postgres, log_dir: Path, *, secrets: int = 10_000, seed: int = 1
) -> RunResult:
    result = RunResult(
        6, "key rotation", f"`keys rotate` over {secrets} secrets SIGKILLed 3 times, restarted"
    )
    rng = random.Random(seed)
    old_key, new_key = generate_key(), generate_key()
    old = TokenCipher.from_setting(old_key)
    new_only = TokenCipher.from_setting(new_key)
    portal = 6001
    async with running_stack(postgres, log_dir, [portal], key=old_key) as stack:
        await stack.install_all()
        # A few events arrive through the service before the rotation.
        before = plan_events([portal], 5, rng=rng, prefix="before-rotation")
        log = DeliveryLog()
        async with httpx.AsyncClient(base_url=stack.web_url, timeout=15) as client:
            for event in before:
                await deliver(client, stack.installed[portal].secret, event, log)
        expected = await seed_secrets(stack.database_url, old, secrets)
        total = await rows_under(stack.database_url, old.primary_key_id)
        say(f"{total} rows under the old key; rotating")
        assert stack.web is not None
        stack.processes.terminate(stack.web)
        started = time.monotonic()
        kills, remaining, rc = await rotate_with_kills(
            stack, f"{new_key},{old_key}", 3, rng, total, old.primary_key_id
        )
        rotate_seconds = time.monotonic() - started
        left = await rows_under(stack.database_url, old.primary_key_id)
        bad = await unreadable(stack.database_url, new_only, expected)
        stale_indexes = await blind_indexes_under(stack.database_url, old.primary_key_id)
        # The old key is removed: the service must start and work with the new key alone.
        stack.key = new_key
        await stack.start_web()
        async with httpx.AsyncClient(base_url=stack.web_url, timeout=15) as client:
            ready = (await client.get("/readyz")).status_code
            after = plan_events([portal], 1, rng=rng, prefix="after-rotation")
            accepted = await deliver(client, stack.installed[portal].secret, after[0], log)
            redelivered = await deliver(client, stack.installed[portal].secret, before[0], log)
    result.sent = total
    result.lost = bad
    result.duplicated = 1 if redelivered == 202 else 0
    result.details = {
        "rows_rotated": total,
        "kills": kills,
        "rows_left_at_each_kill": remaining,
        "final_exit_code": rc,
        "rotate_seconds": round(rotate_seconds, 1),
        "left_under_old_key": left,
        "unreadable_with_new_key_alone": bad,
        "blind_indexes_under_old_key": stale_indexes,
        "readyz_with_new_key_alone": ready,
        "new_event_answer": accepted,
        "redelivery_of_an_older_event": redelivered,
    }
    result.check("killed 3 times mid-way", kills == 3)
    result.check("the restarted rotation finished", rc == 0)
    result.check("no unreadable secret", bad == 0)
    result.check("none left under the old key", left == 0 and stale_indexes == 0)
    result.check("service ready with the old key removed", ready == 200)
    result.check("a new signed event accepted", accepted == 202)
    result.check(
        "a redelivered older event still recognised (200, not stored twice)", redelivered == 200
    )
    return result
