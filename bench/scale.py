"""Lookup latency as the databases grow: a small and a large population, same calls.

The databases are filled through the stores directly (registering a million users over
RPC would take hours of client-side key generation), then the real services answer:
user lookup (IdentityInternalService.GetUserStatus), session validation
(SessionInternalService.ValidateSession) and a user's audit events (ListAuditEvents).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from securemsg.audit.v1 import audit_service_pb2 as audit_pb
from securemsg.audit.v1 import audit_service_pb2_grpc as audit_grpc
from securemsg.identity.v1 import identity_internal_service_pb2 as identity_pb
from securemsg.identity.v1 import identity_internal_service_pb2_grpc as identity_grpc
from securemsg.session.v1 import session_internal_service_pb2 as session_pb
from securemsg.session.v1 import session_internal_service_pb2_grpc as session_grpc

from bench import load
from bench.rpc_cases import aio_channel
from services.audit.model import NewEvent
from services.audit.store import MIGRATIONS as AUDIT_MIGRATIONS
from services.audit.store import SqliteAuditStore
from services.common.audit_events import AuditRecord
from services.common.outbox import SqliteOutbox
from services.common.sqlite import Migration, OpenedDatabase, open_database
from services.identity.keys import SignedKey
from services.identity.model import NewUser
from services.identity.store import MIGRATIONS as IDENTITY_MIGRATIONS
from services.identity.store import SqliteIdentityStore
from services.session.sessions import SessionPolicy, Sessions
from services.session.store import MIGRATIONS as SESSION_MIGRATIONS
from services.session.store import SqliteSessionStore
from tests.support.stack import Stack

PROBES = 200  # users whose rows the calls look up, spread over the population


def _open(stack: Stack, service: str, migrations: list[Migration]) -> OpenedDatabase:
    return open_database(
        stack.db_path(service), service=service,
        master_key=stack.layout.key_file(service).read_text(), kdf_iterations=100_000,
        migrations=migrations, synchronous="NORMAL",
    )  # fmt: skip


def seed(stack: Stack, rows: int) -> list[str]:
    """Fills identity, session and audit with `rows` each; returns probe tokens."""
    step = max(1, rows // PROBES)
    opened = _open(stack, "identity", IDENTITY_MIGRATIONS)
    store = SqliteIdentityStore(
        opened.database, opened.keyring, SqliteOutbox(opened.database, opened.keyring, "identity")
    )
    key, pq = SignedKey(1, bytes(32), bytes(64)), SignedKey(1, bytes(1184), bytes(64))
    for i in range(rows):
        user = NewUser(f"u{i:07}", "A", {}, bytes(32), bytes(32), key, pq, [], time.time())
        store.add_user(user, AuditRecord("user_registered", f"u{i:07}"))
    with opened.database.write() as conn:
        conn.execute("DELETE FROM audit_outbox")  # not what is measured here
    opened.database.close()

    opened = _open(stack, "session", SESSION_MIGRATIONS)
    outbox = SqliteOutbox(opened.database, opened.keyring, "session")
    sessions = Sessions(
        SqliteSessionStore(opened.database, opened.keyring, outbox),
        SessionPolicy(idle_timeout=86400, max_lifetime=86400),
    )
    tokens = []
    for i in range(rows):
        token, _ = sessions.create(f"u{i:07}", "10.0.0.1", "bench")
        if i % step == 0:
            tokens.append(token)
    with opened.database.write() as conn:
        conn.execute("DELETE FROM audit_outbox")
    opened.database.close()

    opened = _open(stack, "audit", AUDIT_MIGRATIONS)
    audit = SqliteAuditStore(opened.database, opened.keyring)
    batch: list[NewEvent] = []
    for i in range(rows):
        batch.append(
            NewEvent(
                uuid.uuid4().hex,
                "user_login",
                "session",
                f"u{i % (rows // 10 + 1):07}",
                time.time(),
                {"ip": "10.0.0.1"},
            )
        )
        if len(batch) == 5000:
            audit.append(batch, time.time())
            batch = []
    if batch:
        audit.append(batch, time.time())
    opened.database.close()
    return tokens


async def lookups(
    stack: Stack, rows: int, tokens: list[str], concurrency: int, seconds: float
) -> list[load.Result]:
    step = max(1, rows // PROBES)
    users = [f"u{i:07}" for i in range(0, rows, step)]
    audited = [f"u{i:07}" for i in range(0, rows // 10 + 1, max(1, (rows // 10) // PROBES))]
    async with (
        aio_channel(stack, "identity", cert="session") as identity_channel,
        aio_channel(stack, "session", cert="relay") as session_channel,
        aio_channel(stack, "audit", cert="operator") as audit_channel,
    ):
        identity: Any = identity_grpc.IdentityInternalServiceStub(identity_channel)
        session: Any = session_grpc.SessionInternalServiceStub(session_channel)
        audit: Any = audit_grpc.AuditServiceStub(audit_channel)

        async def user_lookup(n: int) -> None:
            reply = await identity.GetUserStatus(
                identity_pb.GetUserStatusRequest(user_id=users[n % len(users)]), timeout=10
            )
            assert reply.active

        async def validate(n: int) -> None:
            await session.ValidateSession(
                session_pb.ValidateSessionRequest(token=tokens[n % len(tokens)]), timeout=10
            )

        async def audit_list(n: int) -> None:
            request = audit_pb.ListAuditEventsRequest(
                user_id=audited[n % len(audited)], page_size=20
            )
            await audit.ListAuditEvents(request, timeout=10)

        return [
            await load.run(
                f"user lookup @{rows}", user_lookup, concurrency=concurrency, seconds=seconds
            ),
            await load.run(
                f"session validation @{rows}", validate, concurrency=concurrency, seconds=seconds
            ),
            await load.run(
                f"audit list by user @{rows}", audit_list, concurrency=concurrency, seconds=seconds
            ),
        ]


async def compare(
    root: Path, small: int, large: int, concurrency: int, seconds: float
) -> list[load.Result]:
    results = []
    for rows in (small, large):
        stack = Stack(root / f"scale-{rows}", ("identity", "session", "audit"))
        for name in ("identity", "session", "audit"):
            stack[name].start()  # create the databases and their keys
            stack[name].stop()
        tokens = seed(stack, rows)
        stack.start()
        try:
            results += await lookups(stack, rows, tokens, concurrency, seconds)
        finally:
            stack.stop()
    return results
