"""Session storage in an encrypted SQLite file.

What a stolen file shows: a SHA-256 of each token (useless to log in: tokens are 256-bit
random), a blind index of the user id (rows of one user can be grouped, not named), a
random session id and, rounded up to the minute, when each session expires if unused.
User id, IP address, user agent, login time, absolute and exact idle deadlines and the
assurance level are ciphertext bound to their row.

Every row carries a MAC (purpose key `mac/row/sessions`) over all its columns: a token
hash, deadline, blind index or ciphertext edited, swapped in from another row or set to
NULL makes the row fail with IntegrityError (DATA_LOSS) wherever it is read, and writes
check a row's MAC before changing it, so nothing tampered is ever sealed again. What a
MAC cannot show is a whole row deleted, or put back from an older copy of the file.

Token hashes are unkeyed on purpose: a keyed hash would change with key rotation and
could not be recomputed, since the tokens themselves are never stored.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from services.common.audit_events import AuditRecord
from services.common.crypto import Keyring
from services.common.outbox import OUTBOX_NUMBERING_TABLE, OUTBOX_TABLE, SqliteOutbox
from services.common.rotation import EncryptedTable, Rotatable, RowMac
from services.common.sqlite import Database, Migration, RowSealing, any_of
from services.session.model import Assurance, CountedEvent, NoSuchSession, SessionRecord
from services.session.sealing import (
    EXPIRY_STEP,
    LEGACY_TIMES,
    TIMES,
    SessionSealing,
    coarse,
    mac_values,
    newest_first,
)

ROW_MACS_SINCE = 4

MIGRATIONS = [
    Migration(
        1,
        """
        CREATE TABLE sessions (
            id               INTEGER PRIMARY KEY,
            session_id       TEXT    NOT NULL UNIQUE,
            token_hash       BLOB    NOT NULL UNIQUE,
            user_index       BLOB    NOT NULL,
            user_id_ct       BLOB    NOT NULL,
            ip_ct            BLOB    NOT NULL,
            user_agent_ct    BLOB    NOT NULL,
            times_ct         BLOB    NOT NULL,
            expire_time      REAL    NOT NULL
        ) STRICT;
        CREATE INDEX sessions_by_user ON sessions (user_index);
        CREATE INDEX sessions_by_expiry ON sessions (expire_time);
        """,
    ),
    Migration(2, OUTBOX_TABLE),
    # Level, scope and step-up time, encrypted; NULL for sessions from before.
    Migration(3, "ALTER TABLE sessions ADD COLUMN assurance_ct BLOB;"),
    # Row MACs; existing rows are sealed once, at the upgrade (see SEALING).
    Migration(ROW_MACS_SINCE, "ALTER TABLE sessions ADD COLUMN row_mac BLOB;"),
    Migration(5, OUTBOX_NUMBERING_TABLE),
]


def _row(row: sqlite3.Row) -> dict[str, Any]:
    return {key: row[key] for key in row.keys()}  # noqa: SIM118 - a Row, not a dict


def _seal_legacy(conn: sqlite3.Connection, keyring: Keyring) -> int:
    """Rows from before row MACs: the exact idle deadline moves into times_ct, the
    plaintext one is rounded up, and each row gets its MAC."""
    times = keyring.field("sessions", "times")
    mac = keyring.mac("row/sessions")
    rows = conn.execute("SELECT * FROM sessions WHERE row_mac IS NULL").fetchall()
    for legacy in rows:
        row = _row(legacy)
        row_key = row["session_id"].encode()
        create_time, deadline = LEGACY_TIMES.unpack(times.decrypt(row["times_ct"], row_key))
        row["times_ct"] = times.encrypt(
            TIMES.pack(create_time, deadline, row["expire_time"]), row_key
        )
        row["expire_time"] = coarse(row["expire_time"])
        conn.execute(
            "UPDATE sessions SET times_ct = ?, expire_time = ?, row_mac = ? WHERE id = ?",
            (row["times_ct"], row["expire_time"], mac.tag(*mac_values(row)), row["id"]),
        )
    return len(rows)


SEALING = RowSealing(ROW_MACS_SINCE, _seal_legacy)


class SqliteSessionStore:
    """`SessionStore` in SQLite. Every change is written together with its audit event
    (see services.common.outbox)."""

    def __init__(self, db: Database, keyring: Keyring, outbox: SqliteOutbox) -> None:
        self._db = db
        self._outbox = outbox
        # The row format, shared with PostgreSQL (services/session/sealing.py).
        self._sealing = SessionSealing(keyring)
        self._index = self._sealing.index
        # A user's rows match their index under every loaded key version (see rotation).
        self._user_match = f"user_index IN {any_of(range(self._index.versions))}"

    def rotatables(self) -> list[Rotatable]:
        """The tables key rotation re-encrypts (registered by the wiring, see app.py)."""
        sessions = EncryptedTable(
            self._db,
            "sessions",
            "id",
            "session_id",
            self._sealing.encrypted_fields(),
            self._sealing.reindex(),
            RowMac("row_mac", self._sealing.mac, mac_values),
        )
        return [sessions]

    def add(self, record: SessionRecord, token_hash: bytes, audit: AuditRecord) -> None:
        row = self._sealing.new_row(record, token_hash)
        with self._db.write() as conn:
            conn.execute(
                """INSERT INTO sessions (session_id, token_hash, user_index, user_id_ct, ip_ct,
                       user_agent_ct, times_ct, expire_time, assurance_ct, row_mac)
                   VALUES (:session_id, :token_hash, :user_index, :user_id_ct, :ip_ct,
                       :user_agent_ct, :times_ct, :expire_time, :assurance_ct, :row_mac)""",
                row,
            )
            self._outbox.add(conn, audit)

    def by_token(self, token_hash: bytes, now: float) -> SessionRecord | None:
        with self._db.read(snapshot=False) as conn:
            row = conn.execute(
                "SELECT * FROM sessions WHERE token_hash = ? AND expire_time > ?",
                (token_hash, now),
            ).fetchone()
        if row is None:
            return None
        record = self._sealing.open(self._sealing.check(row))
        return record if record.expire_time > now else None

    def _current(self, conn: sqlite3.Connection, session_id: str) -> dict[str, Any]:
        """A row about to change, once its MAC has been checked (NoSuchSession if gone)."""
        row = conn.execute("SELECT * FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
        if row is None:
            raise NoSuchSession
        return self._sealing.check(row)

    def _rewrite(
        self, conn: sqlite3.Connection, current: dict[str, Any], change: dict[str, Any]
    ) -> None:
        """Writes `change` into a checked row and seals the row again."""
        row = {**current, **change}
        row["row_mac"] = self._sealing.mac.tag(*mac_values(row))
        assignments = ", ".join(f"{column} = :{column}" for column in (*change, "row_mac"))
        conn.execute(
            f"UPDATE sessions SET {assignments} WHERE id = :id",  # noqa: S608 - fixed names
            row,
        )

    def set_expiry(self, session_id: str, expire_time: float) -> None:
        with self._db.write() as conn:
            current = self._current(conn, session_id)
            self._rewrite(conn, current, self._sealing.slid(current, expire_time))

    def set_assurance(self, session_id: str, assurance: Assurance, audit: AuditRecord) -> None:
        sealed = self._sealing.seal_assurance(session_id, assurance)
        with self._db.write() as conn:
            self._rewrite(conn, self._current(conn, session_id), {"assurance_ct": sealed})
            self._outbox.add(conn, audit)

    def for_user(self, user_id: str, now: float) -> list[SessionRecord]:
        with self._db.read(snapshot=False) as conn:
            rows = conn.execute(
                f"SELECT * FROM sessions WHERE {self._user_match} AND expire_time > ?",  # noqa: S608
                (*self._index.candidates(user_id), now),
            ).fetchall()
        records = [self._sealing.open(self._sealing.check(row)) for row in rows]
        return newest_first([r for r in records if r.expire_time > now])

    def delete(self, user_id: str, session_id: str, audit: AuditRecord) -> None:
        with self._db.write() as conn:
            cursor = conn.execute(
                f"DELETE FROM sessions WHERE session_id = ? AND {self._user_match}",  # noqa: S608
                (session_id, *self._index.candidates(user_id)),
            )
            if cursor.rowcount != 1:
                raise NoSuchSession
            self._outbox.add(conn, audit)

    def delete_user(
        self, user_id: str, audit: CountedEvent, *, keep_session_id: str | None = None
    ) -> int:
        with self._db.write() as conn:
            count = conn.execute(
                f"DELETE FROM sessions WHERE {self._user_match} AND session_id IS NOT ?",  # noqa: S608
                (*self._index.candidates(user_id), keep_session_id),
            ).rowcount
            event = audit(count)
            if event is not None:
                self._outbox.add(conn, event)
            return count

    def _lapsed(self, conn: sqlite3.Connection, now: float) -> list[int]:
        """Rows whose exact idle deadline has passed while their rounded-up plaintext one
        has not (at most a minute's worth)."""
        rows = conn.execute(
            "SELECT id, session_id, times_ct FROM sessions"
            " WHERE expire_time > ? AND expire_time <= ?",
            (now, now + EXPIRY_STEP),
        ).fetchall()
        return [int(row["id"]) for row in rows if self._sealing.times_of(row)[2] <= now]

    def delete_expired(self, now: float) -> int:
        with self._db.write() as conn:
            lapsed = self._lapsed(conn, now)
            count = conn.execute("DELETE FROM sessions WHERE expire_time <= ?", (now,)).rowcount
            conn.executemany("DELETE FROM sessions WHERE id = ?", [(i,) for i in lapsed])
            return int(count) + len(lapsed)

    def counts(self, now: float) -> tuple[int, int]:
        """(active sessions, distinct users with one)."""
        with self._db.read() as conn:
            lapsed = self._lapsed(conn, now)
            row = conn.execute(
                "SELECT COUNT(*), COUNT(DISTINCT user_index) FROM sessions"  # noqa: S608
                f" WHERE expire_time > ? AND id NOT IN {any_of(lapsed)}",
                (now, *lapsed),
            ).fetchone()
        return int(row[0]), int(row[1])
