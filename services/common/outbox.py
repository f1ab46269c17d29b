"""Audit outbox: events are stored beside the change they describe, then shipped.

A persistent service writes each audit event into its own database, in the same
transaction as the change (`SqliteOutbox.add`), so the event exists exactly when the
change does. `OutboxShipper` sends batches to AuditIngestService in the background with
exponential backoff and deletes them only after the audit service acknowledged them.
The audit service ignores event ids it already has, so a batch sent twice (say, the
process died between acknowledgement and deletion) is stored once.

The relay has no database; `MemoryOutbox` gives it the same shipper over a bounded
in-memory queue. Events past the bound are dropped, never silently: each is counted
(`securemsg_audit_events_dropped_total`, GetRelayStats.audit_events_dropped) and the log
says when dropping starts and, with the count, when there is room again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import sqlite3
from collections import deque
from collections.abc import Sequence
from typing import Protocol

import grpc
from securemsg.audit.v1 import audit_event_pb2
from securemsg.audit.v1 import audit_ingest_service_pb2 as ingest_pb
from securemsg.audit.v1 import audit_ingest_service_pb2_grpc as ingest_grpc

from services.common import metrics, peer_client
from services.common.audit_events import AuditRecord
from services.common.channels import peer_channel
from services.common.config import Env
from services.common.crypto import Keyring
from services.common.errors import ServiceError
from services.common.rotation import EncryptedTable
from services.common.sqlite import Database

logger = logging.getLogger(__name__)

OUTBOX_TABLE = """
CREATE TABLE audit_outbox (
    id       INTEGER PRIMARY KEY,
    event_id TEXT    NOT NULL UNIQUE,
    event_ct BLOB    NOT NULL
) STRICT;
"""

# The producer's count of its events (AuditEvent.source_sequence), so that the audit
# service can tell when one never arrived (a pending outbox row deleted, say). A
# service adds this in its own migrations after OUTBOX_TABLE.
OUTBOX_NUMBERING_TABLE = """
CREATE TABLE audit_outbox_numbering (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    epoch TEXT    NOT NULL,
    last  INTEGER NOT NULL
) STRICT;
"""

SEND_TIMEOUT_SECONDS = 5.0
BATCH_SIZE = 200


class Outbox(Protocol):
    def peek(self, limit: int) -> list[tuple[int, audit_event_pb2.AuditEvent]]: ...
    def remove(self, ids: Sequence[int]) -> None: ...
    def backlog(self) -> int: ...


class SqliteOutbox:
    """Outbox table in a service's own encrypted database (the event is encrypted whole)."""

    def __init__(self, db: Database, keyring: Keyring, source: str) -> None:
        self._db = db
        self._cipher = keyring.field("audit_outbox", "event")
        self._source = source

    def add(self, conn: sqlite3.Connection, record: AuditRecord) -> None:
        """Adds an event inside the caller's open write transaction, numbered: the number
        goes inside the encrypted event, so it cannot be changed without the key."""
        event = record.to_proto(self._source)
        numbering = conn.execute("SELECT epoch, last FROM audit_outbox_numbering").fetchone()
        if numbering is None:
            epoch, last = secrets.token_hex(16), 0
            conn.execute(
                "INSERT INTO audit_outbox_numbering (id, epoch, last) VALUES (1, ?, 0)", (epoch,)
            )
        else:
            epoch, last = numbering["epoch"], int(numbering["last"])
        conn.execute("UPDATE audit_outbox_numbering SET last = ? WHERE id = 1", (last + 1,))
        event.source_epoch, event.source_sequence = epoch, last + 1
        conn.execute(
            "INSERT INTO audit_outbox (event_id, event_ct) VALUES (?, ?)",
            (
                event.event_id,
                self._cipher.encrypt(event.SerializeToString(), event.event_id.encode()),
            ),
        )

    def rotatable(self) -> EncryptedTable:
        return EncryptedTable(
            self._db, "audit_outbox", "id", "event_id", [("event_ct", self._cipher)]
        )

    def record(self, record: AuditRecord) -> None:
        """Adds an event that goes with no other change (a failed login, say)."""
        with self._db.write() as conn:
            self.add(conn, record)

    def peek(self, limit: int) -> list[tuple[int, audit_event_pb2.AuditEvent]]:
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT id, event_id, event_ct FROM audit_outbox ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
        return [
            (row["id"], audit_event_pb2.AuditEvent.FromString(
                self._cipher.decrypt(row["event_ct"], row["event_id"].encode())
            ))
            for row in rows
        ]  # fmt: skip

    def remove(self, ids: Sequence[int]) -> None:
        with self._db.write() as conn:
            conn.executemany("DELETE FROM audit_outbox WHERE id = ?", [(i,) for i in ids])

    def backlog(self) -> int:
        with self._db.read() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM audit_outbox").fetchone()[0])


class MemoryOutbox:
    """Bounded in-memory outbox for the relay, which must not write to disk."""

    def __init__(self, source: str, capacity: int = 10_000) -> None:
        self._source = source
        self._events: deque[tuple[int, audit_event_pb2.AuditEvent]] = deque()
        self._capacity = capacity
        self._next_id = 1
        # Numbered like the persistent outboxes, from 1 per process: an event dropped
        # below is a gap the audit service reports, not a silent loss.
        self._epoch = secrets.token_hex(16)
        self._last = 0
        self.dropped = 0  # since start
        self._dropped_while_full = 0  # since the outbox last had room

    def record(self, record: AuditRecord) -> None:
        self._last += 1
        if len(self._events) >= self._capacity:
            self.dropped += 1
            self._dropped_while_full += 1
            metrics.AUDIT_DROPPED.inc()
            if self._dropped_while_full == 1:  # one line per episode, not one per event
                logger.error(
                    "audit outbox full: dropping audit events until the audit service "
                    "accepts the backlog",
                    extra={"fields": {"capacity": self._capacity, "action": record.action}},
                )
            return
        event = record.to_proto(self._source)
        event.source_epoch, event.source_sequence = self._epoch, self._last
        self._events.append((self._next_id, event))
        self._next_id += 1

    def peek(self, limit: int) -> list[tuple[int, audit_event_pb2.AuditEvent]]:
        return list(self._events)[:limit]

    def remove(self, ids: Sequence[int]) -> None:
        gone = set(ids)
        while self._events and self._events[0][0] in gone:
            self._events.popleft()
        if self._dropped_while_full and len(self._events) < self._capacity:
            logger.error(
                "audit outbox has room again; audit events were dropped while it was full",
                extra={"fields": {"dropped": self._dropped_while_full, "total": self.dropped}},
            )
            self._dropped_while_full = 0

    def backlog(self) -> int:
        return len(self._events)


class OutboxShipper:
    """Delivers an outbox to the audit service, in order, until cancelled."""

    def __init__(
        self,
        outbox: Outbox,
        channel: grpc.aio.Channel,
        *,
        idle_seconds: float = 1.0,
        max_backoff_seconds: float = 30.0,
    ) -> None:
        self._outbox = outbox
        self._channel = channel
        self._stub = ingest_grpc.AuditIngestServiceStub(channel)
        self._idle = idle_seconds
        self._max_backoff = max_backoff_seconds

    async def run(self) -> None:
        backoff = 0.25
        while True:
            try:
                sent = await self.ship_once()
            except Exception as exc:  # any failure: keep the events, wait, retry
                metrics.AUDIT_SHIP_FAILURES.inc()
                code = exc.code.name if isinstance(exc, ServiceError) else type(exc).__name__
                logger.warning(
                    "audit shipping failed",
                    extra={"fields": {"code": code, "retry_in": round(backoff, 2)}},
                )
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))  # noqa: S311
                backoff = min(backoff * 2, self._max_backoff)
                continue
            backoff = 0.25
            if sent == 0:
                await asyncio.sleep(self._idle)

    async def ship_once(self) -> int:
        """Sends the oldest batch; returns how many events were delivered."""
        batch = await asyncio.to_thread(self._outbox.peek, BATCH_SIZE)
        if not batch:
            return 0
        await peer_client.call(
            self._stub.AppendAuditEvents,
            ingest_pb.AppendAuditEventsRequest(events=[event for _, event in batch]),
            unavailable="audit service unreachable; the events stay in the outbox",
            idempotent=False,  # run() retries with its own backoff
            deadline_seconds=SEND_TIMEOUT_SECONDS,
            wait_for_ready=False,  # while audit is down, back off instead of queueing
        )
        await asyncio.to_thread(self._outbox.remove, [row_id for row_id, _ in batch])
        metrics.AUDIT_SHIPPED.inc(len(batch))
        return len(batch)

    async def close(self) -> None:
        """One last delivery attempt (it matters for the memory outbox), then disconnect."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                while await self.ship_once():
                    pass
        await self._channel.close(grace=None)

    @classmethod
    def from_env(cls, outbox: Outbox, env: Env) -> OutboxShipper:
        metrics.gauge(
            "securemsg_audit_outbox_backlog",
            "Audit events waiting to be delivered",
            outbox.backlog,
        )
        return cls(
            outbox,
            peer_channel(env, "audit"),
            idle_seconds=env.number("AUDIT_SHIP_IDLE_SECONDS", 1.0, minimum=0.01),
            max_backoff_seconds=env.number("AUDIT_SHIP_MAX_BACKOFF_SECONDS", 30.0, minimum=0.1),
        )
