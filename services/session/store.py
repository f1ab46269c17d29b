"""Session storage in an encrypted SQLite file.

What a stolen file shows: a SHA-256 of each token (useless to log in: tokens are 256-bit
random), a blind index of the user id (rows of one user can be grouped, not named), a
random session id and the time each session expires if unused. User id, IP address, user
agent, login time and absolute deadline are ciphertext bound to their row.

Token hashes are unkeyed on purpose: a keyed hash would change with key rotation and
could not be recomputed, since the tokens themselves are never stored.
"""

from __future__ import annotations

import sqlite3
import struct

from services.common.audit_events import AuditRecord
from services.common.crypto import Keyring
from services.common.outbox import OUTBOX_TABLE, SqliteOutbox
from services.common.rotation import EncryptedTable, Reindex, Rotatable
from services.common.sqlite import Database, Migration, any_of
from services.session.model import Assurance, CountedEvent, NoSuchSession, SessionRecord

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
]

_TIMES = struct.Struct(">dd")  # login time, absolute deadline


def _pack_assurance(value: Assurance) -> bytes:
    step_up = "" if value.step_up_time is None else repr(value.step_up_time)
    return f"{value.level}|{value.scope}|{step_up}".encode()


def _unpack_assurance(raw: bytes) -> Assurance:
    level, scope, step_up = raw.decode().split("|")
    return Assurance(level, scope, float(step_up) if step_up else None)


class SqliteSessionStore:
    """`SessionStore` in SQLite. Every change is written together with its audit event
    (see services.common.outbox)."""

    def __init__(self, db: Database, keyring: Keyring, outbox: SqliteOutbox) -> None:
        self._db = db
        self._outbox = outbox
        self._index = keyring.blind_index("sessions.user_id")
        # A user's rows match their index under every loaded key version (see rotation).
        self._user_match = f"user_index IN {any_of(range(self._index.versions))}"
        self._user_id = keyring.field("sessions", "user_id")
        self._ip = keyring.field("sessions", "ip_address")
        self._user_agent = keyring.field("sessions", "user_agent")
        self._times = keyring.field("sessions", "times")
        self._assurance = keyring.field("sessions", "assurance")

    def rotatables(self) -> list[Rotatable]:
        """The tables key rotation re-encrypts (registered by the wiring, see app.py)."""
        sessions = EncryptedTable(
            self._db,
            "sessions",
            "id",
            "session_id",
            [
                ("user_id_ct", self._user_id),
                ("ip_ct", self._ip),
                ("user_agent_ct", self._user_agent),
                ("times_ct", self._times),
                ("assurance_ct", self._assurance),
            ],
            Reindex("user_index", self._index, "user_id_ct"),
        )
        return [sessions]

    def add(self, record: SessionRecord, token_hash: bytes, audit: AuditRecord) -> None:
        row_key = record.session_id.encode()
        with self._db.write() as conn:
            conn.execute(
                """INSERT INTO sessions (session_id, token_hash, user_index, user_id_ct, ip_ct,
                       user_agent_ct, times_ct, expire_time, assurance_ct)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    record.session_id,
                    token_hash,
                    self._index(record.user_id),
                    self._user_id.encrypt_text(record.user_id, row_key),
                    self._ip.encrypt_text(record.ip_address, row_key),
                    self._user_agent.encrypt_text(record.user_agent, row_key),
                    self._times.encrypt(
                        _TIMES.pack(record.create_time, record.absolute_deadline), row_key
                    ),
                    record.expire_time,
                    self._assurance.encrypt(_pack_assurance(record.assurance), row_key),
                ),
            )
            self._outbox.add(conn, audit)

    def _decode(self, row: sqlite3.Row) -> SessionRecord:
        row_key = row["session_id"].encode()
        create_time, deadline = _TIMES.unpack(self._times.decrypt(row["times_ct"], row_key))
        sealed = row["assurance_ct"]
        return SessionRecord(
            session_id=row["session_id"],
            user_id=self._user_id.decrypt_text(row["user_id_ct"], row_key),
            ip_address=self._ip.decrypt_text(row["ip_ct"], row_key),
            user_agent=self._user_agent.decrypt_text(row["user_agent_ct"], row_key),
            create_time=create_time,
            absolute_deadline=deadline,
            expire_time=row["expire_time"],
            assurance=(
                Assurance()
                if sealed is None
                else _unpack_assurance(self._assurance.decrypt(sealed, row_key))
            ),
        )

    def by_token(self, token_hash: bytes, now: float) -> SessionRecord | None:
        with self._db.read(snapshot=False) as conn:
            row = conn.execute(
                "SELECT * FROM sessions WHERE token_hash = ? AND expire_time > ?",
                (token_hash, now),
            ).fetchone()
        return None if row is None else self._decode(row)

    def set_expiry(self, session_id: str, expire_time: float) -> None:
        with self._db.write() as conn:
            cursor = conn.execute(
                "UPDATE sessions SET expire_time = ? WHERE session_id = ?",
                (expire_time, session_id),
            )
            if cursor.rowcount != 1:
                raise NoSuchSession

    def set_assurance(self, session_id: str, assurance: Assurance, audit: AuditRecord) -> None:
        with self._db.write() as conn:
            cursor = conn.execute(
                "UPDATE sessions SET assurance_ct = ? WHERE session_id = ?",
                (
                    self._assurance.encrypt(_pack_assurance(assurance), session_id.encode()),
                    session_id,
                ),
            )
            if cursor.rowcount != 1:
                raise NoSuchSession
            self._outbox.add(conn, audit)

    def for_user(self, user_id: str, now: float) -> list[SessionRecord]:
        with self._db.read(snapshot=False) as conn:
            rows = conn.execute(
                f"SELECT * FROM sessions WHERE {self._user_match} AND expire_time > ?",  # noqa: S608
                (*self._index.candidates(user_id), now),
            ).fetchall()
        # Login times are encrypted, so the order is made here rather than in SQL.
        records = [self._decode(row) for row in rows]
        return sorted(records, key=lambda r: (r.create_time, r.session_id), reverse=True)

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

    def delete_expired(self, now: float) -> int:
        with self._db.write() as conn:
            return conn.execute("DELETE FROM sessions WHERE expire_time <= ?", (now,)).rowcount

    def counts(self, now: float) -> tuple[int, int]:
        """(active sessions, distinct users with one)."""
        with self._db.read() as conn:
            row = conn.execute(
                "SELECT COUNT(*), COUNT(DISTINCT user_index) FROM sessions WHERE expire_time > ?",
                (now,),
            ).fetchone()
        return int(row[0]), int(row[1])
