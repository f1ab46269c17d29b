"""PostgreSQL databases from before row MACs: their rows are sealed once, at the upgrade,
and read exactly as before (as SQLite's RowSealing does for old files)."""

from __future__ import annotations

import time

import psycopg
import pytest

from services.common.crypto import Keyring
from services.common.errors import StartupError
from services.common.postgres.keys import OpenedPgDatabase, PgRowSealing, open_pg_database
from services.common.postgres.outbox import PgOutbox
from services.common.schema import Migration
from services.identity import postgres_store as identity_pg
from services.identity.postgres_store import PostgresIdentityStore
from services.session import postgres_store as session_pg
from services.session.postgres_store import PostgresSessionStore
from services.session.sealing import LEGACY_TIMES
from tests.support.postgres import PostgresServer

KEY = "unit test master key"


def open_pg(
    url: str, service: str, migrations: list[Migration], sealing: PgRowSealing | None = None
) -> OpenedPgDatabase:
    return open_pg_database(
        url,
        service=service,
        master_key=KEY,
        kdf_iterations=100_000,
        migrations=migrations,
        sealing=sealing,
    )


def legacy_user(
    keyring: Keyring, user_id: str, created: float, deactivated: float | None
) -> dict[str, object]:
    index = keyring.blind_index("users.user_id")(user_id)
    return {
        "user_index": index,
        "user_id_ct": keyring.field("users", "user_id").encrypt_text(user_id, index),
        "alias_ct": keyring.field("users", "alias").encrypt_text("Alias", index),
        "metadata_ct": keyring.field("users", "metadata").encrypt_text("{}", index),
        "identity_key": b"i" * 32,
        "verify_key": b"v" * 32,
        "signed_prekey_id": 1,
        "signed_prekey": b"s" * 32,
        "signed_prekey_sig": b"g" * 64,
        "pq_prekey_id": 2,
        "pq_prekey": b"q" * 32,
        "pq_prekey_sig": b"h" * 64,
        "create_time": created,
        "last_login_time": created + 5,
        "deactivate_time": deactivated,
    }


def test_identity_rows_from_before_row_macs_are_sealed_at_the_upgrade(
    postgres: PostgresServer,
) -> None:
    url = postgres.service_database("identity")
    before = [m for m in identity_pg.MIGRATIONS if m.version < identity_pg.ROW_MACS_SINCE]
    old = open_pg(url, "identity", before)
    with psycopg.connect(url) as conn:
        for user_id, deactivated in (("alice", None), ("bob", 1500.0)):
            row = legacy_user(old.keyring, user_id, 1000.0, deactivated)
            user_row = conn.execute(
                f"INSERT INTO users ({', '.join(row)})"
                f" VALUES ({', '.join(['%s'] * len(row))}) RETURNING id",
                tuple(row.values()),
            ).fetchone()
            assert user_row is not None
            conn.execute(
                "INSERT INTO one_time_prekeys (user_row, key_id, public_key) VALUES (%s, 7, %s)",
                (user_row[0], b"k" * 32),
            )
    old.database.close()

    new = open_pg(url, "identity", identity_pg.MIGRATIONS, identity_pg.SEALING)
    store = PostgresIdentityStore(
        new.database, new.keyring, PgOutbox(new.database, new.keyring, "identity", "r")
    )
    alice, bob = store.get_user("alice"), store.get_user("bob")  # MACs hold
    assert alice is not None
    assert bob is not None
    assert (alice.create_time, alice.last_login_time, alice.deactivate_time) == (
        1000.0,
        1005.0,
        None,
    )
    assert bob.deactivate_time == 1500.0
    assert store.is_active("bob") is False
    assert store.take_one_time_prekey("alice") is not None  # the prekey's MAC holds too
    with psycopg.connect(url) as conn:  # the times left the clear columns
        plain = conn.execute("SELECT create_time, last_login_time FROM users").fetchall()
    assert set(plain) == {(0.0, None)}
    new.database.close()


def test_a_database_rewound_to_before_row_macs_refuses_to_start(postgres: PostgresServer) -> None:
    """Someone who can write the database drops the MACs and lowers the schema version,
    hoping that the next start seals a tampered row as if it were a legacy one."""
    url = postgres.service_database("identity")
    open_pg(url, "identity", identity_pg.MIGRATIONS, identity_pg.SEALING).database.close()
    with psycopg.connect(url) as conn:
        conn.execute("ALTER TABLE users DROP COLUMN row_mac, DROP COLUMN times_ct")
        conn.execute("ALTER TABLE one_time_prekeys DROP COLUMN row_mac")
        conn.execute("DROP TABLE audit_outbox_numbering")
        conn.execute("UPDATE securemsg_schema SET version = 4")
    with pytest.raises(StartupError, match="rewound"):
        open_pg(url, "identity", identity_pg.MIGRATIONS, identity_pg.SEALING)


def test_session_rows_from_before_row_macs_are_sealed_at_the_upgrade(
    postgres: PostgresServer,
) -> None:
    url = postgres.service_database("session")
    before = [m for m in session_pg.MIGRATIONS if m.version < session_pg.ROW_MACS_SINCE]
    old = open_pg(url, "session", before)
    now = time.time()
    keyring, row_key = old.keyring, b"s-1"
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO sessions (session_id, token_hash, user_index, user_id_ct, ip_ct,"
            " user_agent_ct, times_ct, expire_time) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (
                "s-1",
                b"t" * 32,
                keyring.blind_index("sessions.user_id")("alice"),
                keyring.field("sessions", "user_id").encrypt_text("alice", row_key),
                keyring.field("sessions", "ip_address").encrypt_text("10.0.0.9", row_key),
                keyring.field("sessions", "user_agent").encrypt_text("agent", row_key),
                keyring.field("sessions", "times").encrypt(
                    LEGACY_TIMES.pack(now, now + 3600), row_key
                ),
                now + 600.5,
            ),
        )
    old.database.close()

    new = open_pg(url, "session", session_pg.MIGRATIONS, session_pg.SEALING)
    store = PostgresSessionStore(
        new.database, new.keyring, PgOutbox(new.database, new.keyring, "session", "r")
    )
    record = store.by_token(b"t" * 32, now)
    assert record is not None
    assert (record.user_id, record.ip_address) == ("alice", "10.0.0.9")
    assert (record.absolute_deadline, record.expire_time) == (now + 3600, now + 600.5)
    new.database.close()
