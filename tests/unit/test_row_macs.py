"""Row MACs on real SQLite files: sealed once at the upgrade, checked on every read and
write, made again by key rotation, never laundered."""

from __future__ import annotations

import contextlib
import hmac
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
from services.identity import store as identity_sqlite
from services.identity.factor_store import SqliteFactorStore
from services.identity.model import NO_FACTORS
from services.identity.store import MIGRATIONS as IDENTITY_MIGRATIONS
from services.identity.store import SEALING as IDENTITY_SEALING
from services.identity.store import SqliteIdentityStore
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


def identity_db(
    path: Path, migrations: list[Migration], sealing: RowSealing | None, key: str = OLD, *old: str
) -> OpenedDatabase:
    return open_database(
        path,
        service="identity",
        master_key=key,
        kdf_iterations=100_000,
        migrations=migrations,
        synchronous="NORMAL",
        old_keys=old,
        sealing=sealing,
    )


def add_legacy_user(opened: OpenedDatabase, user_id: str, prekeys: int) -> None:
    """A users row and its prekeys as the release before row MACs wrote them."""
    index = opened.keyring.blind_index("users.user_id")(user_id)

    def seal(column: str, text: str) -> bytes:
        return opened.keyring.field("users", column).encrypt_text(text, index)

    with opened.database.write() as conn:
        row = conn.execute(
            """INSERT INTO users (user_index, user_id_ct, alias_ct, metadata_ct, identity_key,
                   verify_key, signed_prekey_id, signed_prekey, signed_prekey_sig,
                   pq_prekey_id, pq_prekey, pq_prekey_sig, create_time, last_login_time)
               VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, 1, ?, ?, 1000.0, 2000.0)""",
            (
                index, seal("user_id", user_id), seal("alias", "Legacy"), seal("metadata", "{}"),
                b"i" * 32, b"v" * 32, b"s" * 32, b"g" * 64, b"p" * 1184, b"q" * 64,
            ),
        )  # fmt: skip
        conn.executemany(
            "INSERT INTO one_time_prekeys (user_row, key_id, public_key) VALUES (?, ?, ?)",
            [(row.lastrowid, n, bytes([n]) * 32) for n in range(1, prekeys + 1)],
        )


def identity_store(opened: OpenedDatabase) -> SqliteIdentityStore:
    outbox = SqliteOutbox(opened.database, opened.keyring, "identity")
    return SqliteIdentityStore(opened.database, opened.keyring, outbox)


def test_identity_rows_from_before_are_sealed_and_their_times_moved_out_of_the_clear(
    tmp_path: Path,
) -> None:
    path = tmp_path / "identity.db"
    legacy = identity_db(path, IDENTITY_MIGRATIONS[:3], None)
    add_legacy_user(legacy, "alice", 2)
    add_legacy_user(legacy, "bob", 2)
    legacy.database.close()

    upgraded = identity_db(path, IDENTITY_MIGRATIONS, IDENTITY_SEALING)
    store = identity_store(upgraded)
    alice = store.get_user("alice")
    assert alice is not None
    assert (alice.create_time, alice.last_login_time, alice.deactivate_time) == (
        1000.0,
        2000.0,
        None,
    )
    assert store.get_verify_key("alice") == b"v" * 32
    assert store.take_one_time_prekey("alice") is not None
    with upgraded.database.read() as conn:
        clear = conn.execute("SELECT create_time, last_login_time FROM users").fetchall()
    assert [tuple(row) for row in clear] == [(0.0, None), (0.0, None)]
    upgraded.database.close()

    # One of bob's prekeys is moved to alice (next in line), and bob's row MAC nulled.
    edit(path, "UPDATE one_time_prekeys SET user_row = 1 WHERE user_row = 2 AND key_id = 1")
    edit(path, "UPDATE users SET row_mac = NULL WHERE id = 2")
    again = identity_db(path, IDENTITY_MIGRATIONS, IDENTITY_SEALING)
    store = identity_store(again)
    with pytest.raises(IntegrityError):
        store.take_one_time_prekey("alice")
    with pytest.raises(IntegrityError):
        store.get_verify_key("bob")
    with again.database.read() as conn:  # the refused fetch consumed nothing
        assert conn.execute("SELECT COUNT(*) FROM one_time_prekeys").fetchone()[0] == 3
    again.database.close()


# --- factors rows: MACs since identity's migration 7 ------------------------------------

# The release before factor MACs: users and prekeys sealed (level 1), factors not.
BEFORE_FACTOR_MACS = IDENTITY_MIGRATIONS[: identity_sqlite.FACTOR_MACS_SINCE - 1]
PREVIOUS_SEALING = RowSealing(identity_sqlite.ROW_MACS_SINCE, identity_sqlite._seal_legacy)
CODES = ["A" * 16, "B" * 16]


def factors(opened: OpenedDatabase) -> SqliteFactorStore:
    outbox = SqliteOutbox(opened.database, opened.keyring, "identity")
    return SqliteFactorStore(opened.database, opened.keyring, outbox)


def add_legacy_factors(opened: OpenedDatabase, user_row: int) -> None:
    """A factors row and recovery codes as the release before factor MACs wrote them."""
    keyring, row_key, code_key = opened.keyring, f"row-{user_row}", bytes([user_row]) * 32

    def seal(column: str, text: str) -> bytes:
        return keyring.field("factors", column).encrypt_text(text, row_key.encode())

    with opened.database.write() as conn:
        conn.execute(
            """INSERT INTO factors (user_row, row_key, code_key_ct, totp_secret_ct,
                   totp_last_step, password_ct, password_failures, password_window_start)
               VALUES (?, ?, ?, ?, 42, ?, 2, 50.0)""",
            (
                user_row,
                row_key,
                keyring.field("factors", "code_key").encrypt(code_key, row_key.encode()),
                seal("totp_secret", "SECRET"),
                seal("password", "$argon2id$legacy"),
            ),
        )
        conn.executemany(
            "INSERT INTO recovery_codes (user_row, digest) VALUES (?, ?)",
            [(user_row, hmac.digest(code_key, code.encode(), "sha256")) for code in CODES],
        )


def legacy_identity_file(path: Path) -> None:
    """alice with every factor and bob with none, written before any row MACs, then
    opened once by the release before factor MACs (which seals users rows only)."""
    legacy = identity_db(path, IDENTITY_MIGRATIONS[:3], None)
    add_legacy_user(legacy, "alice", 1)
    add_legacy_user(legacy, "bob", 1)
    add_legacy_factors(legacy, 1)
    legacy.database.close()
    identity_db(path, BEFORE_FACTOR_MACS, PREVIOUS_SEALING).database.close()


def test_factors_rows_from_before_their_macs_are_sealed_once_at_the_upgrade(
    tmp_path: Path,
) -> None:
    path = tmp_path / "identity.db"
    legacy_identity_file(path)

    upgraded = identity_db(path, IDENTITY_MIGRATIONS, IDENTITY_SEALING)
    store = factors(upgraded)
    alice = store.get("alice")
    assert alice is not None
    assert (alice.totp_secret, alice.totp_last_step, alice.password_hash) == (
        "SECRET",
        42,
        "$argon2id$legacy",
    )
    assert (alice.password_failures, alice.password_window_start) == (2, 50.0)
    assert alice.recovery_codes == 2
    assert store.get("bob") == NO_FACTORS  # given an empty row, sealed
    assert store.use_recovery_code("alice", CODES[0], AuditRecord("recovery_code_used"))
    assert identity_store(upgraded).get_verify_key("alice") == b"v" * 32
    upgraded.database.close()

    # The step rewound and the MAC nulled, hoping the next start seals the row again; and
    # bob's (empty) row deleted, hoping it is made again.
    edit(path, "UPDATE factors SET totp_last_step = 0, row_mac = NULL WHERE user_row = 1")
    edit(path, "DELETE FROM factors WHERE user_row = 2")
    again = identity_db(path, IDENTITY_MIGRATIONS, IDENTITY_SEALING)
    with pytest.raises(IntegrityError):
        factors(again).get("alice")
    with pytest.raises(IntegrityError):
        factors(again).get("bob")
    again.database.close()


def test_a_file_rewound_to_before_factor_macs_refuses_to_open(tmp_path: Path) -> None:
    path = tmp_path / "identity.db"
    legacy_identity_file(path)
    identity_db(path, IDENTITY_MIGRATIONS, IDENTITY_SEALING).database.close()
    edit(path, "UPDATE factors SET totp_secret_ct = NULL")  # the second factor removed
    edit(path, "ALTER TABLE factors DROP COLUMN row_mac")
    edit(path, "ALTER TABLE factors DROP COLUMN recovery_set")
    edit(path, f"PRAGMA user_version = {identity_sqlite.FACTOR_MACS_SINCE - 1}")
    with pytest.raises(StartupError, match="rewound"):
        identity_db(path, IDENTITY_MIGRATIONS, IDENTITY_SEALING)


async def test_key_rotation_makes_every_factors_mac_again_and_stops_at_a_tampered_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "identity.db"
    legacy_identity_file(path)
    identity_db(path, IDENTITY_MIGRATIONS, IDENTITY_SEALING).database.close()

    opened = identity_db(path, IDENTITY_MIGRATIONS, IDENTITY_SEALING, NEW, OLD)
    tables = [*identity_store(opened).rotatables(), factors(opened).rotatable()]
    rotation = KeyRotation(opened.database, opened.keyring, tables, None)
    await rotation.run()
    with opened.database.read() as conn:
        macs = [row[0] for row in conn.execute("SELECT row_mac FROM factors")]
    assert len(macs) == 2
    assert {Mac.version_of(mac) for mac in macs} == {2}
    opened.database.close()
    after = identity_db(path, IDENTITY_MIGRATIONS, IDENTITY_SEALING, NEW)  # old key retired
    alice = factors(after).get("alice")
    assert alice is not None
    assert alice.password_hash == "$argon2id$legacy"
    after.database.close()

    edit(path, "UPDATE factors SET password_failures = 0 WHERE user_row = 1")
    third = "a third master key"
    rotating = identity_db(path, IDENTITY_MIGRATIONS, IDENTITY_SEALING, third, NEW)
    store = factors(rotating)
    with pytest.raises(IntegrityError):
        store.rotatable().rotate_batch(0, 10)
    with pytest.raises(IntegrityError):  # still refused: nothing was laundered
        store.get("alice")
    rotating.database.close()
