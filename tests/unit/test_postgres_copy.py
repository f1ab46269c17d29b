"""Copying a SQLite deployment into PostgreSQL: verbatim, atomic, every row still opening
with its MAC holding, outbox numbering continuing, the audit chain still verifying."""

from __future__ import annotations

import shutil
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import psycopg
import pytest

from services.audit import postgres_store as audit_pg
from services.audit.model import NewEvent
from services.audit.postgres_store import PostgresAuditStore
from services.audit.store import MIGRATIONS as AUDIT_SQLITE
from services.audit.store import SqliteAuditStore
from services.client.keys import UserKeys
from services.common import audit_events
from services.common.audit_events import AuditRecord
from services.common.errors import StartupError
from services.common.outbox import SqliteOutbox
from services.common.postgres.copy import copy_sqlite_to_postgres
from services.common.postgres.keys import OpenedPgDatabase, open_pg_database
from services.common.postgres.outbox import PgOutbox
from services.common.schema import Migration
from services.common.sqlite import OpenedDatabase, open_database
from services.identity import postgres_store as identity_pg
from services.identity.domain import Identity
from services.identity.postgres_store import PostgresIdentityStore
from services.identity.store import MIGRATIONS as IDENTITY_SQLITE
from services.identity.store import SqliteIdentityStore
from services.session import postgres_store as session_pg
from services.session.model import SessionRecord
from services.session.postgres_store import PostgresSessionStore
from services.session.store import MIGRATIONS as SESSION_SQLITE
from services.session.store import SqliteSessionStore
from tests.fakes.identity import RecordingRevoker
from tests.support.postgres import PostgresServer
from tests.unit.conftest import FakeClock, registration

KEY = "unit test master key"


def opened(path: Path, service: str, migrations: list[Migration]) -> OpenedDatabase:
    return open_database(
        path,
        service=service,
        master_key=KEY,
        kdf_iterations=100_000,
        migrations=migrations,
        synchronous="NORMAL",
    )


def identity_file(path: Path) -> tuple[SqliteIdentityStore, SqliteOutbox, OpenedDatabase]:
    source = opened(path, "identity", IDENTITY_SQLITE)
    outbox = SqliteOutbox(source.database, source.keyring, "identity")
    return SqliteIdentityStore(source.database, source.keyring, outbox), outbox, source


def copy_identity(path: Path, url: str) -> int:
    return copy_sqlite_to_postgres(
        path, url, service="identity", master_key=KEY, migrations=identity_pg.MIGRATIONS
    )


def open_pg(url: str, service: str, migrations: list[Migration]) -> OpenedPgDatabase:
    return open_pg_database(
        url, service=service, master_key=KEY, kdf_iterations=100_000, migrations=migrations
    )


def test_a_copied_identity_database_opens_with_its_macs_and_numbering_intact(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    store, outbox, source = identity_file(tmp_path / "identity.db")
    identity = Identity(store, RecordingRevoker(), FakeClock())
    for name in ("alice", "bob", "carol"):
        identity.register(registration(name, UserKeys.generate(4), alias=f"{name} A."))
    store.record_login("alice", 1234.5)
    assert store.take_one_time_prekey("bob") is not None
    store.deactivate("carol", 2000.0, AuditRecord(audit_events.USER_DEACTIVATED, "carol"))
    users = {name: store.get_user(name) for name in ("alice", "bob", "carol")}
    revocations = store.pending_revocations(10)
    events = outbox.peek(100)
    source.database.close()

    url = postgres.service_database("identity")
    copied = copy_identity(tmp_path / "identity.db", url)
    assert copied > 0
    pg = open_pg(url, "identity", identity_pg.MIGRATIONS)
    pg_outbox = PgOutbox(pg.database, pg.keyring, "identity", "r")
    pg_store = PostgresIdentityStore(pg.database, pg.keyring, pg_outbox)
    # Every row opens and its MAC holds: the same users, times and prekey pools.
    assert {name: pg_store.get_user(name) for name in users} == users
    assert pg_store.is_active("carol") is False
    assert pg_store.get_verify_key("alice") == users["alice"].verify_key  # type: ignore[union-attr]
    assert pg_store.take_one_time_prekey("bob") is not None
    assert [r.user_id for r in pg_store.pending_revocations(10)] == [r.user_id for r in revocations]
    # The outbox ships the same events, and numbering continues in the same epoch.
    assert [e for _, e in pg_outbox.peek(100)] == [e for _, e in events]
    Identity(pg_store, RecordingRevoker(), FakeClock()).register(
        registration("dave", UserKeys.generate(2))
    )
    shipped = [e for _, e in pg_outbox.peek(100)]
    assert shipped[-1].source_epoch == events[-1][1].source_epoch
    assert shipped[-1].source_sequence == events[-1][1].source_sequence + 1
    pg.database.close()


def test_a_copied_session_still_validates(tmp_path: Path, postgres: PostgresServer) -> None:
    source = opened(tmp_path / "session.db", "session", SESSION_SQLITE)
    outbox = SqliteOutbox(source.database, source.keyring, "session")
    store = SqliteSessionStore(source.database, source.keyring, outbox)
    now = time.time()
    record = SessionRecord("s-1", "alice", "10.1.2.3", "agent/1", now, now + 3600, now + 600)
    store.add(record, b"h" * 32, AuditRecord(audit_events.USER_LOGIN, "alice"))
    source.database.close()
    url = postgres.service_database("session")
    copy_sqlite_to_postgres(
        tmp_path / "session.db",
        url,
        service="session",
        master_key=KEY,
        migrations=session_pg.MIGRATIONS,
    )
    pg = open_pg(url, "session", session_pg.MIGRATIONS)
    pg_store = PostgresSessionStore(
        pg.database, pg.keyring, PgOutbox(pg.database, pg.keyring, "session", "r")
    )
    assert pg_store.by_token(b"h" * 32, now) == record
    pg_store.set_expiry("s-1", now + 900)  # changed and sealed again on PostgreSQL
    found = pg_store.by_token(b"h" * 32, now)
    assert found is not None
    assert found.expire_time == now + 900
    pg.database.close()


def test_a_file_postgresql_cannot_hold_whole_is_refused_whole(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    """A column or table the PostgreSQL layout lacks would be dropped, and rows without
    MACs would read as tampered: such a file is refused, and nothing is copied."""
    path = tmp_path / "identity.db"
    store, _, source = identity_file(path)
    Identity(store, RecordingRevoker(), FakeClock()).register(
        registration("user-1", UserKeys.generate(2))
    )
    source.database.close()
    for change, complaint in (
        ("ALTER TABLE users ADD COLUMN nickname_ct BLOB", "nickname_ct"),
        ("CREATE TABLE devices (id INTEGER PRIMARY KEY)", "devices"),
        ("UPDATE one_time_prekeys SET row_mac = NULL", "without a MAC"),
    ):
        copy = tmp_path / "changed.db"
        shutil.copy(path, copy)
        with closing(sqlite3.connect(copy)) as file, file:
            file.execute(change)
        url = postgres.service_database("identity")
        with pytest.raises(StartupError, match=complaint):
            copy_identity(copy, url)
        with psycopg.connect(url) as pg:  # the transaction left nothing behind
            tables = pg.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            assert tables.fetchone() == (0,)


def test_a_copied_audit_log_still_verifies(tmp_path: Path, postgres: PostgresServer) -> None:
    source = opened(tmp_path / "audit.db", "audit", AUDIT_SQLITE)
    sqlite_store = SqliteAuditStore(source.database, source.keyring)
    for batch in range(5):
        sqlite_store.append(
            [
                NewEvent(f"e{batch}-{i}", "user_login", "session", f"u{i}", 1000.0 + i, {"n": "1"})
                for i in range(10)
            ],
            2000.0,
        )
    source.database.close()
    url = postgres.service_database("audit")
    copy_sqlite_to_postgres(
        tmp_path / "audit.db", url, service="audit", master_key=KEY, migrations=audit_pg.MIGRATIONS
    )
    pg = open_pg_database(
        url, service="audit", master_key=KEY, kdf_iterations=100_000, migrations=audit_pg.MIGRATIONS
    )
    store = PostgresAuditStore(pg.database, pg.keyring)
    result = store.verify()
    assert result.ok, result.problem
    assert result.checked == 50
    store.append([NewEvent("after", "user_login", "session", "u1", 3000.0, {})], 3000.0)
    assert store.verify().checked == 51  # appends continue the copied chain
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE audit_events SET occur_time = 1 WHERE sequence = 20")
    assert store.verify().first_bad_sequence == 20
    pg.database.close()
