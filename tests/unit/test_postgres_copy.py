"""Copying a SQLite deployment into PostgreSQL: verbatim, atomic, still decrypting and
still verifying."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from services.audit import postgres_store as audit_pg
from services.audit.model import NewEvent
from services.audit.postgres_store import PostgresAuditStore
from services.audit.store import MIGRATIONS as AUDIT_SQLITE
from services.audit.store import SqliteAuditStore
from services.client.keys import UserKeys
from services.common.errors import StartupError
from services.common.outbox import SqliteOutbox
from services.common.postgres.copy import copy_sqlite_to_postgres
from services.common.postgres.keys import open_pg_database
from services.common.schema import Migration
from services.common.sqlite import OpenedDatabase, open_database
from services.identity import postgres_store as identity_pg
from services.identity.domain import Identity
from services.identity.store import MIGRATIONS as IDENTITY_SQLITE
from services.identity.store import SqliteIdentityStore
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


def test_a_file_with_columns_postgresql_lacks_is_refused_whole(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    """Identity's SQLite rows carry row MACs and sealed times that its PostgreSQL layout
    does not have yet: copying would drop their protection, so nothing is copied."""
    source = opened(tmp_path / "identity.db", "identity", IDENTITY_SQLITE)
    outbox = SqliteOutbox(source.database, source.keyring, "identity")
    store = SqliteIdentityStore(source.database, source.keyring, outbox)
    Identity(store, RecordingRevoker(), FakeClock()).register(
        registration("user-1", UserKeys.generate(2))
    )
    source.database.close()
    url = postgres.service_database("identity")
    with pytest.raises(StartupError, match="row_mac"):
        copy_sqlite_to_postgres(
            tmp_path / "identity.db",
            url,
            service="identity",
            master_key=KEY,
            migrations=identity_pg.MIGRATIONS,
        )
    with psycopg.connect(url) as conn:  # the transaction left nothing behind
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
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
