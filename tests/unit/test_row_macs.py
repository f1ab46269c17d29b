"""Row MACs on real SQLite files: sealed once at the upgrade, checked on every read and
write, made again by key rotation, never laundered."""

from __future__ import annotations

import contextlib
import sqlite3
import struct
from pathlib import Path

import pytest

from services.common.audit_events import AuditRecord
from services.common.crypto import Mac
from services.common.errors import IntegrityError, StartupError
from services.common.outbox import SqliteOutbox
from services.common.rotation import KeyRotation
from services.common.sqlite import Migration, OpenedDatabase, RowSealing, open_database
from services.session.model import SessionRecord
from services.session.store import MIGRATIONS as SESSION_MIGRATIONS
from services.session.store import SEALING as SESSION_SEALING
from services.session.store import SqliteSessionStore

OLD, NEW = "the old master key", "the new master key"
TOKEN_HASH = b"h" * 32


def open_db(
    path: Path,
    migrations: list[Migration],
    sealing: RowSealing | None,
    key: str = OLD,
    *old: str,
) -> OpenedDatabase:
    return open_database(
        path,
        service="session",
        master_key=key,
        kdf_iterations=100_000,
        migrations=migrations,
        synchronous="NORMAL",
        old_keys=old,
        sealing=sealing,
    )


def sessions(opened: OpenedDatabase) -> SqliteSessionStore:
    outbox = SqliteOutbox(opened.database, opened.keyring, "session")
    return SqliteSessionStore(opened.database, opened.keyring, outbox)


def edit(path: Path, sql: str) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(sql)


def add_legacy_session(opened: OpenedDatabase, session_id: str, expire: float) -> None:
    """A row as the release before row MACs wrote it."""
    key = session_id.encode()

    def seal(column: str, value: bytes) -> bytes:
        return opened.keyring.field("sessions", column).encrypt(value, key)

    with opened.database.write() as conn:
        conn.execute(
            """INSERT INTO sessions (session_id, token_hash, user_index, user_id_ct, ip_ct,
                   user_agent_ct, times_ct, expire_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                session_id,
                TOKEN_HASH,
                opened.keyring.blind_index("sessions.user_id")("alice"),
                seal("user_id", b"alice"),
                seal("ip_address", b"10.0.0.1"),
                seal("user_agent", b"phone"),
                seal("times", struct.pack(">dd", 100.0, 50_000.0)),
                1234.5,
            ),
        )


def test_rows_from_before_are_sealed_once_at_the_upgrade_and_never_again(tmp_path: Path) -> None:
    path = tmp_path / "session.db"
    legacy = open_db(path, SESSION_MIGRATIONS[:3], None)
    add_legacy_session(legacy, "s1", 1234.5)
    legacy.database.close()

    upgraded = open_db(path, SESSION_MIGRATIONS, SESSION_SEALING)
    record = sessions(upgraded).by_token(TOKEN_HASH, 1000.0)
    assert record is not None
    assert (record.user_id, record.expire_time) == ("alice", 1234.5)  # exact, though stored
    upgraded.database.close()  # rounded up in the clear (1260)

    # Someone edits the row and nulls its MAC, hoping the next start seals it again.
    edit(path, "UPDATE sessions SET expire_time = 9e9, row_mac = NULL")
    again = open_db(path, SESSION_MIGRATIONS, SESSION_SEALING)
    with pytest.raises(IntegrityError):
        sessions(again).by_token(TOKEN_HASH, 1000.0)
    again.database.close()


def test_a_sealed_file_rewound_to_an_older_schema_refuses_to_open(tmp_path: Path) -> None:
    path = tmp_path / "session.db"
    open_db(path, SESSION_MIGRATIONS, SESSION_SEALING).database.close()
    edit(path, "ALTER TABLE sessions DROP COLUMN row_mac")
    edit(path, "PRAGMA user_version = 3")
    with pytest.raises(StartupError, match="rewound"):
        open_db(path, SESSION_MIGRATIONS, SESSION_SEALING)


def add_session(store: SqliteSessionStore, session_id: str, token_hash: bytes) -> None:
    record = SessionRecord(session_id, "alice", "10.0.0.1", "phone", 100.0, 50_000.0, 2000.0)
    store.add(record, token_hash, AuditRecord("user_login", "alice"))


async def test_key_rotation_makes_every_row_mac_again_under_the_new_key(tmp_path: Path) -> None:
    path = tmp_path / "session.db"
    first = open_db(path, SESSION_MIGRATIONS, SESSION_SEALING)
    for n in range(5):
        add_session(sessions(first), f"s{n}", bytes([n]) * 32)
    first.database.close()

    opened = open_db(path, SESSION_MIGRATIONS, SESSION_SEALING, NEW, OLD)
    store = sessions(opened)
    rotation = KeyRotation(opened.database, opened.keyring, store.rotatables(), None)
    await rotation.run()
    with opened.database.read() as conn:
        versions = {Mac.version_of(row[0]) for row in conn.execute("SELECT row_mac FROM sessions")}
    assert versions == {2}
    opened.database.close()
    after = open_db(path, SESSION_MIGRATIONS, SESSION_SEALING, NEW)  # the old key retired
    assert sessions(after).by_token(bytes([3]) * 32, 1000.0) is not None
    after.database.close()


def test_key_rotation_stops_at_a_tampered_row_instead_of_sealing_it(tmp_path: Path) -> None:
    path = tmp_path / "session.db"
    first = open_db(path, SESSION_MIGRATIONS, SESSION_SEALING)
    add_session(sessions(first), "s1", TOKEN_HASH)
    first.database.close()
    edit(path, "UPDATE sessions SET expire_time = 9e9")
    opened = open_db(path, SESSION_MIGRATIONS, SESSION_SEALING, NEW, OLD)
    store = sessions(opened)
    with pytest.raises(IntegrityError):
        store.rotatables()[0].rotate_batch(0, 10)
    with pytest.raises(IntegrityError):  # still refused: nothing was laundered
        store.by_token(TOKEN_HASH, 1000.0)
    opened.database.close()
