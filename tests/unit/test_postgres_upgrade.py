"""PostgreSQL databases from before row MACs (and from before factors row MACs): their
rows are sealed once, at the upgrade, and read exactly as before (as SQLite's RowSealing
does for old files)."""

from __future__ import annotations

import hmac
import time

import psycopg
import pytest

from services.common.crypto import Keyring, Mac
from services.common.errors import IntegrityError, StartupError
from services.common.postgres.keys import (
    OpenedPgDatabase,
    PgRowSealing,
    open_pg_database,
    retire_versions,
)
from services.common.postgres.outbox import PgOutbox
from services.common.rotation import KeyRotation
from services.common.schema import Migration
from services.identity import postgres_store as identity_pg
from services.identity.model import NO_FACTORS
from services.identity.postgres_factors import PostgresFactorStore
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


def add_legacy_factors(url: str, keyring: Keyring, user_row: int) -> None:
    """A factors row and recovery codes as the release before factor MACs wrote them."""
    row_key, code_key = f"row-{user_row}", bytes([user_row]) * 32

    def seal(column: str, text: str) -> bytes:
        return keyring.field("factors", column).encrypt_text(text, row_key.encode())

    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO factors (user_row, row_key, code_key_ct, totp_secret_ct,"
            " totp_last_step, password_ct, password_failures, password_window_start)"
            " VALUES (%s, %s, %s, %s, 42, %s, 2, 50.0)",
            (
                user_row,
                row_key,
                keyring.field("factors", "code_key").encrypt(code_key, row_key.encode()),
                seal("totp_secret", "SECRET"),
                seal("password", "$argon2id$legacy"),
            ),
        )
        for code in ("A" * 16, "B" * 16):
            conn.execute(
                "INSERT INTO recovery_codes (user_row, digest) VALUES (%s, %s)",
                (user_row, hmac.digest(code_key, code.encode(), "sha256")),
            )


def legacy_identity_database(url: str) -> None:
    """alice with every factor and bob with none, written before row MACs, then opened
    once by the release before factor MACs (which seals users rows only)."""
    before = [m for m in identity_pg.MIGRATIONS if m.version < identity_pg.ROW_MACS_SINCE]
    old = open_pg(url, "identity", before)
    with psycopg.connect(url) as conn:
        for user_id in ("alice", "bob"):
            row = legacy_user(old.keyring, user_id, 1000.0, None)
            conn.execute(
                f"INSERT INTO users ({', '.join(row)}) VALUES ({', '.join(['%s'] * len(row))})",
                tuple(row.values()),
            )
    add_legacy_factors(url, old.keyring, 1)
    old.database.close()
    previous = [m for m in identity_pg.MIGRATIONS if m.version < identity_pg.FACTOR_MACS_SINCE]
    sealing = PgRowSealing(identity_pg.ROW_MACS_SINCE, identity_pg._seal_legacy)
    open_pg(url, "identity", previous, sealing).database.close()


def factor_store(opened: OpenedPgDatabase) -> PostgresFactorStore:
    outbox = PgOutbox(opened.database, opened.keyring, "identity", "r")
    return PostgresFactorStore(opened.database, opened.keyring, outbox)


def test_factors_rows_from_before_their_macs_are_sealed_once_at_the_upgrade(
    postgres: PostgresServer,
) -> None:
    url = postgres.service_database("identity")
    legacy_identity_database(url)
    new = open_pg(url, "identity", identity_pg.MIGRATIONS, identity_pg.SEALING)
    store = factor_store(new)
    alice = store.get("alice")
    assert alice is not None
    assert (alice.totp_secret, alice.totp_last_step, alice.password_hash) == (
        "SECRET",
        42,
        "$argon2id$legacy",
    )
    assert (alice.password_failures, alice.recovery_codes) == (2, 2)
    assert store.get("bob") == NO_FACTORS
    new.database.close()

    with psycopg.connect(url) as conn:  # nulled, hoping the next start seals it again
        conn.execute("UPDATE factors SET totp_last_step = 0, row_mac = NULL WHERE user_row = 1")
    again = open_pg(url, "identity", identity_pg.MIGRATIONS, identity_pg.SEALING)
    with pytest.raises(IntegrityError):
        factor_store(again).get("alice")
    again.database.close()


def test_a_database_rewound_to_before_factor_macs_refuses_to_start(
    postgres: PostgresServer,
) -> None:
    url = postgres.service_database("identity")
    legacy_identity_database(url)
    open_pg(url, "identity", identity_pg.MIGRATIONS, identity_pg.SEALING).database.close()
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE factors SET totp_secret_ct = NULL")
        conn.execute("ALTER TABLE factors DROP COLUMN row_mac, DROP COLUMN recovery_set")
        conn.execute(
            "UPDATE securemsg_schema SET version = %s", (identity_pg.FACTOR_MACS_SINCE - 1,)
        )
    with pytest.raises(StartupError, match="rewound"):
        open_pg(url, "identity", identity_pg.MIGRATIONS, identity_pg.SEALING)


async def test_key_rotation_makes_every_factors_mac_again(postgres: PostgresServer) -> None:
    url = postgres.service_database("identity")
    legacy_identity_database(url)
    open_pg(url, "identity", identity_pg.MIGRATIONS, identity_pg.SEALING).database.close()
    opened = open_pg_database(
        url,
        service="identity",
        master_key="the next master key",
        kdf_iterations=100_000,
        migrations=identity_pg.MIGRATIONS,
        old_keys=[KEY],
        sealing=identity_pg.SEALING,
    )
    db = opened.database
    users = PostgresIdentityStore(db, opened.keyring, PgOutbox(db, opened.keyring, "identity", "r"))
    tables = [*users.rotatables(), factor_store(opened).rotatable()]
    rotation = KeyRotation(
        None, opened.keyring, tables, None, retire=lambda keep: retire_versions(db, keep)
    )
    await rotation.run()
    with psycopg.connect(url) as conn:
        macs = [bytes(row[0]) for row in conn.execute("SELECT row_mac FROM factors")]
    assert len(macs) == 2
    assert {Mac.version_of(mac) for mac in macs} == {2}
    alice = factor_store(opened).get("alice")
    assert alice is not None
    assert alice.password_hash == "$argon2id$legacy"
    db.close()

    with psycopg.connect(url) as conn:
        conn.execute("UPDATE factors SET password_failures = 0 WHERE user_row = 1")
    rotating = open_pg_database(
        url,
        service="identity",
        master_key="a third master key",
        kdf_iterations=100_000,
        migrations=identity_pg.MIGRATIONS,
        old_keys=["the next master key"],
        sealing=identity_pg.SEALING,
    )
    store = factor_store(rotating)
    with pytest.raises(IntegrityError):  # a tampered row stops the rotation
        store.rotatable().rotate_batch(0, 10)
    with pytest.raises(IntegrityError):  # still refused: nothing was laundered
        store.get("alice")
    rotating.database.close()
