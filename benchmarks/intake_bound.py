"""A bound for measurement 3: the receptionist path with no web framework and no ORM.

Not Hubline, and never deployed: it answers how fast the work a receptionist webhook
cannot skip could go in one Python process, so the intake figure can be read against
what this stack allows rather than against the bare endpoint alone. It does, per
request, what Hubline's route must do on its success path:

- verify the Standard Webhooks signature (HMAC-SHA256 over id.timestamp.body, in the
  5-minute window), written inline instead of through the `standardwebhooks` library;
- parse the JSON and validate it with Hubline's own `parse_event` (phone parsing included);
- hash the idempotency key and encrypt the payload with Hubline's `TokenCipher`;
- store it durably: requests arriving together share one multi-row INSERT … ON CONFLICT
  DO NOTHING RETURNING and one commit, through the `sqlite3` module on one thread;
- answer 202 with the stored event's id, after the commit.

And leaves out what Hubline adds around it: Starlette's routing, middleware and request
objects, request ids, metrics, logs, the portal lookup, SQLAlchemy and aiosqlite, and
every error path (anything but a valid signed event for the one portal is a 500). A
repeat answers 200 without naming the stored event. Served by uvicorn as `hubline serve`
is (benchmarks/servers.py), on the SQLite file of a migrated Hubline database.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from starlette.types import Receive, Scope, Send

from app.crypto import TokenCipher
from app.models import utcnow
from app.receptionist import parse_event
from app.vault import payload_context

ROUTE = re.compile(r"/webhooks/portals/(\d{1,18})/receptionist")
TOLERANCE_SECONDS = 300
COLUMNS = (
    "portal_id, source, type, idempotency_hash, occurred_at, received_at, payload_ct, "
    "key_id, status, attempts, run_after"
)
ROW = "(" + ", ".join("?" * len(COLUMNS.split(", "))) + ")"
# SQLite's default limit on bound parameters is 32,766: 11 columns, 2,978 rows.
MOST_ROWS = 2_000


def signed(body: bytes, headers: dict[bytes, bytes], key: bytes, now: float) -> bool:
    message_id = headers.get(b"webhook-id")
    timestamp = headers.get(b"webhook-timestamp")
    signatures = headers.get(b"webhook-signature")
    if not (message_id and timestamp and signatures and timestamp.isdigit()):
        return False
    if abs(now - int(timestamp)) > TOLERANCE_SECONDS:
        return False
    expected = base64.b64encode(
        hmac.digest(key, message_id + b"." + timestamp + b"." + body, hashlib.sha256)
    )
    return any(
        version == b"v1" and hmac.compare_digest(signature, expected)
        for version, _, signature in (entry.partition(b",") for entry in signatures.split())
    )


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")


@dataclass
class GroupCommit:
    """Rows from concurrent requests stored by one INSERT and one commit on one thread."""

    path: str
    pending: list[tuple[tuple[Any, ...], asyncio.Future[int | None]]] = field(default_factory=list)
    writing: bool = False

    def __post_init__(self) -> None:
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="bound-sqlite")
        self.connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        # Hubline's pragmas (app/db.py): WAL, durable at each commit.
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute("PRAGMA busy_timeout=30000")
        self.connection.execute("PRAGMA synchronous=NORMAL")

    async def store(self, row: tuple[Any, ...]) -> int | None:
        """The new event's id once committed; None when the key was already stored."""
        done: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self.pending.append((row, done))
        if not self.writing:
            self.writing = True
            asyncio.get_running_loop().create_task(self._write_pending())
        return await done

    async def _write_pending(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.pending:
                group, self.pending = self.pending[:MOST_ROWS], self.pending[MOST_ROWS:]
                rows = [row for row, _ in group]
                try:
                    ids = await loop.run_in_executor(self.thread, self._insert, rows)
                except Exception as error:  # every request of the group answers 500
                    for _, done in group:
                        done.set_exception(error)
                    continue
                for row, done in group:
                    done.set_result(ids.get(row[3]))
        finally:
            self.writing = False

    def _insert(self, rows: list[tuple[Any, ...]]) -> dict[str, int]:
        statement = (
            f"INSERT INTO events ({COLUMNS}) VALUES {', '.join([ROW] * len(rows))} "  # noqa: S608
            "ON CONFLICT DO NOTHING RETURNING idempotency_hash, id"
        )
        parameters = [value for row in rows for value in row]
        self.connection.execute("BEGIN")
        try:
            ids = dict(self.connection.execute(statement, parameters).fetchall())
        except BaseException:
            self.connection.execute("ROLLBACK")
            raise
        self.connection.execute("COMMIT")
        return ids


class IntakeBound:
    """The ASGI app: one portal, one secret, one SQLite file."""

    def __init__(self, *, database_path: str, secret: str, encryption_keys: str) -> None:
        self.database_path = database_path
        self.key = base64.b64decode(secret.removeprefix("whsec_"))
        self.cipher = TokenCipher.from_setting(encryption_keys)
        self.writer: GroupCommit | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        route = ROUTE.fullmatch(scope["path"])
        if scope["path"] == "/healthz":
            await self._answer(send, 200, b'{"status":"ok"}')
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = dict(scope["headers"])
        if route is None or not signed(body, headers, self.key, time.time()):
            raise RuntimeError("the bound takes only signed receptionist events")
        portal_id = int(route.group(1))
        received_at = utcnow()
        event = parse_event(
            json.loads(body),
            webhook_id=headers.get(b"webhook-id", b"").decode(),
            region="US",
            received_at=received_at,
        )
        key_hash = self.cipher.blind_indexes("event", f"receptionist\x00{event.id}", portal_id)[0]
        sealed = self.cipher.encrypt(
            event.model_dump_json(), context=payload_context(portal_id, key_hash)
        )
        now = _stamp(received_at)
        assert self.writer is not None
        event_id = await self.writer.store(
            (
                portal_id,
                "receptionist",
                event.type,
                key_hash,
                _stamp(event.occurred_at),
                now,
                sealed,
                self.cipher.primary_key_id,
                "pending",
                0,
                now,
            )
        )
        if event_id is None:
            await self._answer(send, 200, b'{"status":"duplicate"}')
        else:
            await self._answer(send, 202, b'{"status":"accepted","event_id":%d}' % event_id)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.writer = GroupCommit(self.database_path)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.writer is not None:
                    self.writer.thread.shutdown()
                    self.writer.connection.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    @staticmethod
    async def _answer(send: Send, status: int, body: bytes) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(body)),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
