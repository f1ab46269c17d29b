"""The audit log in an encrypted SQLite file, linked into a keyed hash chain (the
algorithm is in services.audit.chain; this module stores rows, links and the head, the
head in the same transaction as the rows).

What a stolen file shows: event ids, actions, sources, times, and which events concern
the same (unnamed) user. User ids and details are ciphertext.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from services.audit import chain
from services.audit.chain import GENESIS, Boundary, Chain, ChainedRow, Head, LinkedRow
from services.audit.model import NewEvent, Query, StoredEvent, Verification
from services.common.crypto import Keyring
from services.common.errors import IntegrityError
from services.common.rotation import Rotatable
from services.common.sqlite import Database, Migration, RowSealing, any_of

BOUNDARY_MACS_SINCE = 3

MIGRATIONS = [
    Migration(
        1,
        """
        CREATE TABLE audit_events (
            sequence    INTEGER PRIMARY KEY,
            event_id    TEXT    NOT NULL UNIQUE,
            action      TEXT    NOT NULL,
            source      TEXT    NOT NULL,
            user_index  BLOB,
            user_id_ct  BLOB,
            details_ct  BLOB    NOT NULL,
            occur_time  REAL    NOT NULL,
            record_time REAL    NOT NULL,
            link        BLOB    NOT NULL
        ) STRICT;
        CREATE INDEX audit_by_user ON audit_events (user_index, sequence);
        CREATE INDEX audit_by_action ON audit_events (action, sequence);
        CREATE INDEX audit_by_time ON audit_events (occur_time);
        CREATE TABLE audit_head (
            id       INTEGER PRIMARY KEY CHECK (id = 1),
            sequence INTEGER NOT NULL,
            link     BLOB    NOT NULL
        ) STRICT;
        """,
    ),
    Migration(
        2,
        """
        ALTER TABLE audit_events ADD COLUMN chain_version INTEGER NOT NULL DEFAULT 1;
        CREATE TABLE audit_rotation (
            id       INTEGER PRIMARY KEY CHECK (id = 1),
            boundary INTEGER NOT NULL,
            old_link BLOB    NOT NULL
        ) STRICT;
        """,
    ),
    # Each producer's numbering (chained with the event), and a MAC on the rotation
    # boundary (sealed at the upgrade if a rotation is under way, see SEALING).
    Migration(
        BOUNDARY_MACS_SINCE,
        """
        ALTER TABLE audit_events ADD COLUMN source_epoch TEXT;
        ALTER TABLE audit_events ADD COLUMN source_sequence INTEGER;
        ALTER TABLE audit_rotation ADD COLUMN boundary_mac BLOB;
        """,
    ),
]


def _seal_legacy(conn: sqlite3.Connection, keyring: Keyring) -> int:
    """A rotation boundary written before boundaries had MACs gets one, as it is."""
    row = conn.execute("SELECT boundary, old_link FROM audit_rotation WHERE id = 1").fetchone()
    if row is None:
        return 0
    tag = keyring.mac("audit/rotation_boundary").tag(row["boundary"], bytes(row["old_link"]))
    conn.execute("UPDATE audit_rotation SET boundary_mac = ? WHERE id = 1", (tag,))
    return 1


SEALING = RowSealing(BOUNDARY_MACS_SINCE, _seal_legacy)


def _chained(row: sqlite3.Row | dict[str, Any]) -> ChainedRow:
    return ChainedRow(
        sequence=row["sequence"],
        event_id=row["event_id"],
        action=row["action"],
        source=row["source"],
        user_index=None if row["user_index"] is None else bytes(row["user_index"]),
        user_id_ct=None if row["user_id_ct"] is None else bytes(row["user_id_ct"]),
        details_ct=bytes(row["details_ct"]),
        occur_time=row["occur_time"],
        record_time=row["record_time"],
        source_epoch=row["source_epoch"],
        source_sequence=row["source_sequence"],
    )


def _linked(row: sqlite3.Row) -> LinkedRow:
    return LinkedRow(_chained(row), bytes(row["link"]), int(row["chain_version"]))


class SqliteAuditStore:
    """`AuditStore` in SQLite."""

    def __init__(self, db: Database, keyring: Keyring) -> None:
        self._db = db
        self._index = keyring.blind_index("audit_events.user_id")
        self._user_id = keyring.field("audit_events", "user_id")
        self._details = keyring.field("audit_events", "details")
        self._chain = Chain(keyring.chain_keys(), keyring.primary_version)
        self._primary = keyring.primary_version
        self._boundary_mac = keyring.mac("audit/rotation_boundary")
        self._head_at_last_batch: int | None = None  # see rotate_batch

    def append(self, events: list[NewEvent], now: float) -> tuple[int, int]:
        """Appends the batch in order, skipping known event ids: (appended, duplicates)."""
        appended = duplicates = 0
        with self._db.write() as conn:
            head = conn.execute("SELECT sequence, link FROM audit_head WHERE id = 1").fetchone()
            sequence, link = (head["sequence"], head["link"]) if head else (0, GENESIS)
            for event in events:
                known = conn.execute(
                    "SELECT 1 FROM audit_events WHERE event_id = ?", (event.event_id,)
                ).fetchone()
                if known:
                    duplicates += 1
                    continue
                sequence += 1
                row_key = event.event_id.encode()
                row: dict[str, Any] = {
                    "sequence": sequence,
                    "event_id": event.event_id,
                    "action": event.action,
                    "source": event.source,
                    "user_index": self._index(event.user_id) if event.user_id else None,
                    "user_id_ct": (
                        self._user_id.encrypt_text(event.user_id, row_key)
                        if event.user_id
                        else None
                    ),
                    "details_ct": self._details.encrypt_text(
                        json.dumps(event.details, sort_keys=True), row_key
                    ),
                    "occur_time": event.occur_time,
                    "record_time": now,
                    "source_epoch": event.source_epoch or None,
                    "source_sequence": event.source_sequence or None,
                }
                link = self._chain.link(link, _chained(row))
                conn.execute(
                    """INSERT INTO audit_events (sequence, event_id, action, source, user_index,
                           user_id_ct, details_ct, occur_time, record_time, link, chain_version,
                           source_epoch, source_sequence)
                       VALUES (:sequence, :event_id, :action, :source, :user_index, :user_id_ct,
                               :details_ct, :occur_time, :record_time, :link, :chain_version,
                               :source_epoch, :source_sequence)""",
                    {**row, "link": link, "chain_version": self._primary},
                )
                appended += 1
            if appended:
                conn.execute(
                    "INSERT INTO audit_head (id, sequence, link) VALUES (1, ?, ?)"
                    " ON CONFLICT (id) DO UPDATE SET sequence = excluded.sequence,"
                    " link = excluded.link",
                    (sequence, link),
                )
        return appended, duplicates

    def _decode(self, row: sqlite3.Row) -> StoredEvent:
        row_key = row["event_id"].encode()
        return StoredEvent(
            sequence=row["sequence"],
            event_id=row["event_id"],
            action=row["action"],
            source=row["source"],
            user_id=(
                self._user_id.decrypt_text(row["user_id_ct"], row_key) if row["user_id_ct"] else ""
            ),
            occur_time=row["occur_time"],
            record_time=row["record_time"],
            details=json.loads(self._details.decrypt_text(row["details_ct"], row_key)),
        )

    def query(self, query: Query) -> list[StoredEvent]:
        """Matching events, newest (highest sequence) first."""
        clauses: list[str] = ["1 = 1"]
        params: list[object] = []
        if query.user_id:
            candidates = self._index.candidates(query.user_id)
            clauses.append(f"user_index IN {any_of(candidates)}")
            params.extend(candidates)
        if query.action:
            clauses.append("action = ?")
            params.append(query.action)
        if query.start_time is not None:
            clauses.append("occur_time >= ?")
            params.append(query.start_time)
        if query.end_time is not None:
            clauses.append("occur_time < ?")
            params.append(query.end_time)
        if query.before_sequence is not None:
            clauses.append("sequence < ?")
            params.append(query.before_sequence)
        sql = (
            "SELECT * FROM audit_events WHERE "  # noqa: S608 - clauses are fixed strings
            + " AND ".join(clauses)
            + " ORDER BY sequence DESC LIMIT ?"
        )
        with self._db.read(snapshot=False) as conn:
            rows = conn.execute(sql, (*params, query.limit)).fetchall()
        return [self._decode(row) for row in rows]

    def verify(self, start: int = 1, limit: int = 0) -> Verification:
        """Checks events from `start` (at most `limit` of them, 0 = all): each against the
        stored link before it. Names the first position that fails.

        Runs in one read transaction, so appends and rotation batches wait for it.
        """
        start = max(start, 1)
        with self._db.read() as conn:
            try:
                boundary = self._rotation_boundary(conn)
            except IntegrityError:
                total = int(conn.execute("SELECT COUNT(*) FROM audit_events").fetchone()[0])
                problem = "the key rotation's boundary record was altered"
                return Verification(False, 0, start, problem, 0, total)
            head = conn.execute("SELECT sequence, link FROM audit_head WHERE id = 1").fetchone()
            total = int(conn.execute("SELECT COUNT(*) FROM audit_events").fetchone()[0])
            previous: bytes | None = GENESIS
            if start > 1:
                before = conn.execute(
                    "SELECT link FROM audit_events WHERE sequence = ?", (start - 1,)
                ).fetchone()
                previous = None if before is None else bytes(before["link"])
            # Where each producer's numbering stood before this slice (checked by the
            # slices before it).
            numbered = conn.execute(
                "SELECT source, source_epoch, MAX(source_sequence) FROM audit_events"
                " WHERE sequence < ? AND source_epoch IS NOT NULL GROUP BY source, source_epoch",
                (start,),
            )
            numbering = chain.Numbering({(r[0], r[1]): int(r[2]) for r in numbered})
            rows = conn.execute(
                "SELECT * FROM audit_events WHERE sequence >= ? ORDER BY sequence LIMIT ?",
                (start, limit if limit > 0 else -1),
            )
            return chain.verify(
                self._chain,
                map(_linked, rows),
                start=start,
                previous=previous,
                head=Head(head["sequence"], bytes(head["link"])) if head else None,
                boundary=boundary,
                total=total,
                limit=limit,
                numbering=numbering,
            )

    def _rotation_boundary(self, conn: sqlite3.Connection) -> Boundary | None:
        """Where a rotation under way stands; IntegrityError if the record was altered
        (it decides where verification switches from new links to old ones)."""
        row = conn.execute(
            "SELECT boundary, old_link, boundary_mac FROM audit_rotation WHERE id = 1"
        ).fetchone()
        if row is None:
            return None
        self._boundary_mac.check(row["boundary_mac"], row["boundary"], bytes(row["old_link"]))
        return Boundary(row["boundary"], bytes(row["old_link"]))

    # Key rotation: re-encrypt each event and re-link the chain under the primary key, in
    # sequence order. Every old link is checked before it is replaced, so a rotation never
    # launders tampering: it stops with an integrity error at the first bad event.

    def rotatables(self) -> list[Rotatable]:
        """What key rotation walks (registered by the wiring, see app.py): the log itself."""
        return [self]

    def rotate_batch(self, after: int, limit: int) -> tuple[int, int]:
        with self._db.write() as conn:
            started = self._rotation_boundary(conn)
            if started is None:
                if after > 0:  # this pass already reached the head and closed the rotation
                    return after, 0
                boundary, old_prev = 0, GENESIS
            else:
                boundary, old_prev = started.sequence, started.old_link
            head = conn.execute("SELECT sequence FROM audit_head WHERE id = 1").fetchone()
            head_sequence = head["sequence"] if head else 0
            # Events appended during a rotation chain on old links and join its work: each
            # batch also takes up those appended since the last one, so the distance to the
            # head shrinks by a full batch every time and a steady stream of appends cannot
            # keep the rotation from finishing.
            if self._head_at_last_batch is not None:
                limit += max(0, head_sequence - self._head_at_last_batch)
            self._head_at_last_batch = head_sequence
            rows = conn.execute(
                "SELECT * FROM audit_events WHERE sequence > ? ORDER BY sequence LIMIT ?",
                (boundary, limit),
            ).fetchall()
            if not rows:
                conn.execute("DELETE FROM audit_rotation")
                return after, 0
            previous = conn.execute(
                "SELECT link FROM audit_events WHERE sequence = ?", (boundary,)
            ).fetchone()
            new_prev = previous["link"] if previous else GENESIS
            for row in rows:
                if not self._chain.holds(old_prev, _linked(row)):
                    raise IntegrityError(
                        f"audit event {row['sequence']} fails its link; rotation stopped"
                    )
                old_prev = row["link"]
                new_prev = self._rechain_row(conn, row, new_prev)
            last = rows[-1]["sequence"]
            if head_sequence == last:
                conn.execute("UPDATE audit_head SET link = ? WHERE id = 1", (new_prev,))
                conn.execute("DELETE FROM audit_rotation")
            else:
                conn.execute(
                    "INSERT INTO audit_rotation (id, boundary, old_link, boundary_mac)"
                    " VALUES (1, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
                    " boundary = excluded.boundary, old_link = excluded.old_link,"
                    " boundary_mac = excluded.boundary_mac",
                    (last, old_prev, self._boundary_mac.tag(last, bytes(old_prev))),
                )
        return int(last), len(rows)

    def _rechain_row(self, conn: sqlite3.Connection, row: sqlite3.Row, prev: bytes) -> bytes:
        row_key = row["event_id"].encode()
        updated = dict(row)
        updated["details_ct"] = self._details.reencrypt(row["details_ct"], row_key, row_key)
        if row["user_id_ct"] is not None:
            user_id = self._user_id.decrypt_text(row["user_id_ct"], row_key)
            updated["user_id_ct"] = self._user_id.encrypt_text(user_id, row_key)
            updated["user_index"] = self._index(user_id)
        link = self._chain.link(prev, _chained(updated))
        conn.execute(
            """UPDATE audit_events SET details_ct = ?, user_id_ct = ?, user_index = ?, link = ?,
                   chain_version = ? WHERE sequence = ?""",
            (
                updated["details_ct"],
                updated["user_id_ct"],
                updated["user_index"],
                link,
                self._primary,
                row["sequence"],
            ),
        )
        return link

    def remaining(self) -> int:
        with self._db.read() as conn:
            boundary = self._rotation_boundary(conn)
            if boundary is not None:
                query = "SELECT COUNT(*) FROM audit_events WHERE sequence > ?"
                return int(conn.execute(query, (boundary.sequence,)).fetchone()[0])
            query = "SELECT COUNT(*) FROM audit_events WHERE chain_version != ?"
            return int(conn.execute(query, (self._primary,)).fetchone()[0])

    def counts(self) -> dict[str, int]:
        with self._db.read() as conn:
            rows = conn.execute("SELECT action, COUNT(*) FROM audit_events GROUP BY action")
            return {row[0]: int(row[1]) for row in rows}
