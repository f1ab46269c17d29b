"""The audit log in PostgreSQL, appended to by any number of audit replicas.

One gapless sequencer: every append transaction first locks the `audit_head` row
(SELECT ... FOR UPDATE), then numbers its events from the head's sequence and links them
from the head's link, then moves the head, and commits. Concurrent appends through other
replicas wait for that lock, so sequences never repeat or skip. A SEQUENCE would not do:
a rolled-back transaction burns its numbers, which verification reports as deletions.

Duplicate event ids (a batch shipped twice, perhaps to two replicas) are looked up after
the head lock is held, so the second sender sees the first one's commit.

Key rotation re-links the chain in sequence order, holding the head lock in each batch
(appends wait for a batch, not for the whole rotation) and, through `fence`, proving in the
same transaction that this replica still holds the rotation lease.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.audit import chain
from services.audit.chain import GENESIS, Boundary, Chain, ChainedRow, Head
from services.audit.model import NewEvent, Query, StoredEvent, Verification
from services.audit.sealing import COLUMNS, EventSealing, chained, linked
from services.common.crypto import Keyring
from services.common.errors import IntegrityError
from services.common.postgres.database import Connection, PgDatabase
from services.common.schema import Migration

MIGRATIONS = [
    Migration(
        1,
        """
        CREATE TABLE audit_events (
            sequence      bigint           PRIMARY KEY,
            event_id      text             NOT NULL UNIQUE,
            action        text             NOT NULL,
            source        text             NOT NULL,
            user_index    bytea,
            user_id_ct    bytea,
            details_ct    bytea            NOT NULL,
            occur_time    double precision NOT NULL,
            record_time   double precision NOT NULL,
            link          bytea            NOT NULL,
            chain_version integer          NOT NULL DEFAULT 1
        );
        CREATE INDEX audit_by_user ON audit_events (user_index, sequence);
        CREATE INDEX audit_by_action ON audit_events (action, sequence);
        CREATE INDEX audit_by_time ON audit_events (occur_time);
        CREATE TABLE audit_head (
            id       integer PRIMARY KEY CHECK (id = 1),
            sequence bigint  NOT NULL,
            link     bytea   NOT NULL
        );
        INSERT INTO audit_head (id, sequence, link) VALUES (1, 0, decode(repeat('00', 32), 'hex'));
        """,
    ),
    Migration(
        2,
        """
        CREATE TABLE audit_rotation (
            id       integer PRIMARY KEY CHECK (id = 1),
            boundary bigint  NOT NULL,
            old_link bytea   NOT NULL
        );
        """,
    ),
    # Each producer's numbering, chained with the event (as SQLite's migration 3).
    Migration(
        3,
        """
        ALTER TABLE audit_events ADD COLUMN source_epoch text;
        ALTER TABLE audit_events ADD COLUMN source_sequence bigint;
        ALTER TABLE audit_rotation ADD COLUMN boundary_mac bytea;
        """,
    ),
]

_INSERT = (
    f"INSERT INTO audit_events ({', '.join(COLUMNS)})"  # noqa: S608
    f" VALUES ({', '.join(['%s'] * len(COLUMNS))})"
)

Fence = Callable[[Connection], None]


def _values(row: ChainedRow, link: bytes, version: int) -> tuple[object, ...]:
    return (
        row.sequence,
        row.event_id,
        row.action,
        row.source,
        row.user_index,
        row.user_id_ct,
        row.details_ct,
        row.occur_time,
        row.record_time,
        link,
        version,
        row.source_epoch,
        row.source_sequence,
    )


class PostgresAuditStore:
    """`AuditStore` in PostgreSQL."""

    def __init__(self, db: PgDatabase, keyring: Keyring, fence: Fence | None = None) -> None:
        self._db = db
        self._sealing = EventSealing(keyring)
        self._index = self._sealing.index
        self._chain = Chain(keyring.chain_keys(), keyring.primary_version)
        self._primary = keyring.primary_version
        self._boundary_mac = keyring.mac("audit/rotation_boundary")
        self._fence = fence
        self._head_at_last_batch: int | None = None  # see rotate_batch

    @staticmethod
    def _lock_head(conn: Connection) -> Head:
        row = conn.execute(
            "SELECT sequence, link FROM audit_head WHERE id = 1 FOR UPDATE"
        ).fetchone()
        if row is None:
            raise IntegrityError("the audit head row is missing")
        return Head(int(row["sequence"]), bytes(row["link"]))

    def append(self, events: list[NewEvent], now: float) -> tuple[int, int]:
        """Appends the batch in order, skipping known event ids: (appended, duplicates)."""
        with self._db.write() as conn:
            head = self._lock_head(conn)  # the sequencer: one appender at a time
            known = {
                str(r["event_id"])
                for r in conn.execute(
                    "SELECT event_id FROM audit_events WHERE event_id = ANY(%s)",
                    ([e.event_id for e in events],),
                )
            }
            sequence, link = head.sequence, head.link
            values: list[tuple[object, ...]] = []
            for event in events:
                if event.event_id in known:
                    continue
                known.add(event.event_id)
                sequence += 1
                row = self._sealing.seal(event, sequence, now)
                link = self._chain.link(link, row)
                values.append(_values(row, link, self._primary))
            if values:
                with conn.cursor() as cursor:
                    cursor.executemany(_INSERT, values)
                conn.execute(
                    "UPDATE audit_head SET sequence = %s, link = %s WHERE id = 1", (sequence, link)
                )
        return len(values), len(events) - len(values)

    def query(self, query: Query) -> list[StoredEvent]:
        """Matching events, newest (highest sequence) first."""
        clauses: list[str] = ["true"]
        params: list[object] = []
        if query.user_id:
            clauses.append("user_index = ANY(%s)")
            params.append(self._index.candidates(query.user_id))
        if query.action:
            clauses.append("action = %s")
            params.append(query.action)
        if query.start_time is not None:
            clauses.append("occur_time >= %s")
            params.append(query.start_time)
        if query.end_time is not None:
            clauses.append("occur_time < %s")
            params.append(query.end_time)
        if query.before_sequence is not None:
            clauses.append("sequence < %s")
            params.append(query.before_sequence)
        sql = (
            "SELECT * FROM audit_events WHERE "  # noqa: S608 - clauses are fixed strings
            + " AND ".join(clauses)
            + " ORDER BY sequence DESC LIMIT %s"
        )
        with self._db.connection() as conn:
            rows = conn.execute(sql, (*params, query.limit)).fetchall()
        return [self._sealing.open(row) for row in rows]

    def verify(self, start: int = 1, limit: int = 0) -> Verification:
        """Checks events from `start` (at most `limit`, 0 = all) against the stored links,
        in one snapshot; rows stream through a server-side cursor."""
        start = max(start, 1)
        with self._db.read() as conn:
            count = conn.execute("SELECT count(*) AS n FROM audit_events").fetchone()
            total = int(count["n"]) if count else 0
            try:
                boundary = self._boundary(conn)
            except IntegrityError:
                problem = "the key rotation's boundary record was altered"
                return Verification(False, 0, start, problem, 0, total)
            head = conn.execute("SELECT sequence, link FROM audit_head WHERE id = 1").fetchone()
            previous: bytes | None = GENESIS
            if start > 1:
                before = conn.execute(
                    "SELECT link FROM audit_events WHERE sequence = %s", (start - 1,)
                ).fetchone()
                previous = None if before is None else bytes(before["link"])
            # Where each producer's numbering stood before this slice.
            numbered = conn.execute(
                "SELECT source, source_epoch, max(source_sequence) AS last FROM audit_events"
                " WHERE sequence < %s AND source_epoch IS NOT NULL"
                " GROUP BY source, source_epoch",
                (start,),
            )
            numbering = chain.Numbering(
                {(str(r["source"]), str(r["source_epoch"])): int(r["last"]) for r in numbered}
            )
            with conn.cursor(name="verify") as cursor:
                cursor.itersize = 2000
                cursor.execute(
                    "SELECT * FROM audit_events WHERE sequence >= %s ORDER BY sequence LIMIT %s",
                    (start, limit if limit > 0 else None),
                )
                return chain.verify(
                    self._chain,
                    map(linked, cursor),
                    start=start,
                    previous=previous,
                    head=Head(int(head["sequence"]), bytes(head["link"])) if head else None,
                    boundary=boundary,
                    total=total,
                    limit=limit,
                    numbering=numbering,
                )

    def _boundary(self, conn: Connection) -> Boundary | None:
        """Where a rotation under way stands; IntegrityError if the record was altered
        (it decides where verification switches from new links to old ones)."""
        row = conn.execute(
            "SELECT boundary, old_link, boundary_mac FROM audit_rotation WHERE id = 1"
        ).fetchone()
        if row is None:
            return None
        mac = None if row["boundary_mac"] is None else bytes(row["boundary_mac"])
        self._boundary_mac.check(mac, int(row["boundary"]), bytes(row["old_link"]))
        return Boundary(int(row["boundary"]), bytes(row["old_link"]))

    def counts(self) -> dict[str, int]:
        with self._db.connection() as conn:
            rows = conn.execute("SELECT action, count(*) AS n FROM audit_events GROUP BY action")
            return {str(row["action"]): int(row["n"]) for row in rows}

    # Key rotation (see the SQLite store: every old link is checked before it is
    # replaced, so a rotation never launders tampering).

    def rotatables(self) -> list[PostgresAuditStore]:
        return [self]

    def rotate_batch(self, after: int, limit: int) -> tuple[int, int]:
        with self._db.write() as conn:
            if self._fence is not None:
                self._fence(conn)
            head = self._lock_head(conn)  # appends wait for this batch
            started = self._boundary(conn)
            if started is None:
                if after > 0:  # this pass already reached the head and closed the rotation
                    return after, 0
                boundary, old_prev = 0, GENESIS
            else:
                boundary, old_prev = started.sequence, started.old_link
            # Events appended during a rotation chain on old links and join its work: each
            # batch also takes up those appended since this replica's last batch, so the
            # distance to the head shrinks by a full batch every time and a steady stream of
            # appends cannot keep the rotation from finishing (as on SQLite).
            if self._head_at_last_batch is not None:
                limit += max(0, head.sequence - self._head_at_last_batch)
            self._head_at_last_batch = head.sequence
            rows = conn.execute(
                "SELECT * FROM audit_events WHERE sequence > %s ORDER BY sequence LIMIT %s",
                (boundary, limit),
            ).fetchall()
            if not rows:
                conn.execute("DELETE FROM audit_rotation")
                return after, 0
            previous = conn.execute(
                "SELECT link FROM audit_events WHERE sequence = %s", (boundary,)
            ).fetchone()
            new_prev = bytes(previous["link"]) if previous else GENESIS
            for row in rows:
                if not self._chain.holds(old_prev, linked(row)):
                    raise IntegrityError(
                        f"audit event {row['sequence']} fails its link; rotation stopped"
                    )
                old_prev = bytes(row["link"])
                new_prev = self._rechain_row(conn, row, new_prev)
            last = int(rows[-1]["sequence"])
            if head.sequence == last:
                conn.execute("UPDATE audit_head SET link = %s WHERE id = 1", (new_prev,))
                conn.execute("DELETE FROM audit_rotation")
            else:
                conn.execute(
                    "INSERT INTO audit_rotation (id, boundary, old_link, boundary_mac)"
                    " VALUES (1, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET"
                    " boundary = excluded.boundary, old_link = excluded.old_link,"
                    " boundary_mac = excluded.boundary_mac",
                    (last, old_prev, self._boundary_mac.tag(last, old_prev)),
                )
        return last, len(rows)

    def _rechain_row(self, conn: Connection, row: dict[str, Any], prev: bytes) -> bytes:
        updated = self._sealing.reseal(chained(row))
        link = self._chain.link(prev, updated)
        conn.execute(
            "UPDATE audit_events SET details_ct = %s, user_id_ct = %s, user_index = %s,"
            " link = %s, chain_version = %s WHERE sequence = %s",
            (
                updated.details_ct,
                updated.user_id_ct,
                updated.user_index,
                link,
                self._primary,
                updated.sequence,
            ),
        )
        return link

    def remaining(self) -> int:
        with self._db.read() as conn:
            boundary = self._boundary(conn)
            if boundary is not None:
                row = conn.execute(
                    "SELECT count(*) AS n FROM audit_events WHERE sequence > %s",
                    (boundary.sequence,),
                ).fetchone()
            else:
                row = conn.execute(
                    "SELECT count(*) AS n FROM audit_events WHERE chain_version <> %s",
                    (self._primary,),
                ).fetchone()
        return int(row["n"]) if row else 0
