"""Key rotation: new primary key, old rows re-encrypted in batches, old key retired."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from services.audit.model import NewEvent, Query
from services.audit.store import MIGRATIONS as AUDIT_MIGRATIONS
from services.audit.store import SqliteAuditStore
from services.client.keys import UserKeys
from services.common.errors import IntegrityError, StartupError
from services.common.outbox import SqliteOutbox
from services.common.rotation import KeyRotation
from services.common.sqlite import Migration, OpenedDatabase, open_database
from services.identity.domain import Identity
from services.identity.store import MIGRATIONS as IDENTITY_MIGRATIONS
from services.identity.store import SqliteIdentityStore
from tests.fakes.identity import RecordingRevoker
from tests.unit.conftest import registration

OLD, NEW = "the old master key", "the new master key"


def open_db(
    path: Path, key: str, migrations: list[Migration], *old: str, service: str = "identity"
) -> OpenedDatabase:
    return open_database(
        path,
        service=service,
        master_key=key,
        kdf_iterations=100_000,
        migrations=migrations,
        synchronous="NORMAL",
        old_keys=old,
    )


def identity_on(opened: OpenedDatabase) -> tuple[Identity, SqliteIdentityStore]:
    outbox = SqliteOutbox(opened.database, opened.keyring, "identity")
    store = SqliteIdentityStore(opened.database, opened.keyring, outbox)
    return Identity(store, RecordingRevoker()), store


def test_a_new_key_with_the_old_one_records_a_new_primary_version(tmp_path: Path) -> None:
    path = tmp_path / "identity.db"
    open_db(path, OLD, IDENTITY_MIGRATIONS).database.close()
    opened = open_db(path, NEW, IDENTITY_MIGRATIONS, OLD)
    assert opened.keyring.versions == [2, 1]
    opened.database.close()
    with pytest.raises(StartupError, match=r"key version\(s\) 1 .* still protect data"):
        open_db(path, NEW, IDENTITY_MIGRATIONS)
    with pytest.raises(StartupError, match="does not unlock"):
        open_db(path, "neither of them", IDENTITY_MIGRATIONS)


async def test_rotation_reencrypts_everything_while_lookups_keep_working(tmp_path: Path) -> None:
    path = tmp_path / "identity.db"
    before = open_db(path, OLD, IDENTITY_MIGRATIONS)
    identity, _ = identity_on(before)
    for i in range(30):
        identity.register(registration(f"user{i:02}", UserKeys.generate(1)))
    before.database.close()

    during = open_db(path, NEW, IDENTITY_MIGRATIONS, OLD)
    identity, store = identity_on(during)
    outbox = SqliteOutbox(during.database, during.keyring, "identity")
    tables = [*store.rotatables(), outbox.rotatable()]
    rotation = KeyRotation(during.database, during.keyring, tables, None, batch_size=7)
    # 30 users, their 30 one-time prekeys (a MAC each) and 30 audit events
    assert rotation.status().rows_remaining == 90
    store.rotatables()[0].rotate_batch(0, 10)  # part way: ten users re-encrypted
    assert identity.profile("user03").user_id == "user03"  # rotated row
    assert identity.profile("user25").user_id == "user25"  # not yet rotated
    identity.register(registration("newcomer", UserKeys.generate(1)))  # under the new key
    with pytest.raises(Exception, match="already taken"):
        identity.register(registration("user25", UserKeys.generate(1)))

    await rotation.run()
    status = rotation.status()
    assert (status.rows_remaining, status.old_keys_retirable) == (0, True)
    assert status.rows_done >= 50
    during.database.close()

    after = open_db(path, NEW, IDENTITY_MIGRATIONS)  # the old key is no longer needed
    identity, _ = identity_on(after)
    assert [identity.profile(f"user{i:02}").alias for i in (0, 29)] == ["Alias", "Alias"]
    assert identity.bundle("newcomer").one_time_prekey is not None
    after.database.close()


def audit_events(count: int, start: int = 0) -> list[NewEvent]:
    return [
        NewEvent(f"e{start + i}", "user_login", "session", f"user{i % 3}", time.time(), {"n": "1"})
        for i in range(count)
    ]


async def test_audit_rotation_relinks_the_chain_and_verifies_at_every_step(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.db"
    first = open_db(path, OLD, AUDIT_MIGRATIONS, service="audit")
    SqliteAuditStore(first.database, first.keyring).append(audit_events(20), time.time())
    first.database.close()

    opened = open_db(path, NEW, AUDIT_MIGRATIONS, OLD, service="audit")
    store = SqliteAuditStore(opened.database, opened.keyring)
    assert store.rotate_batch(0, 8) == (8, 8)
    assert store.verify().ok  # half re-linked, half on old links
    store.append(audit_events(5, start=100), time.time())  # appends go on meanwhile
    assert store.verify().ok
    rotation = KeyRotation(opened.database, opened.keyring, store.rotatables(), None)
    await rotation.run()
    assert rotation.status().old_keys_retirable
    result = store.verify()
    assert (result.ok, result.checked) == (True, 25)
    everything_about_user1 = Query("user1", None, None, None, None, limit=100)
    assert len(store.query(everything_about_user1)) == 9
    opened.database.close()


def test_audit_rotation_finishes_while_appends_outpace_each_batch(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    first = open_db(path, OLD, AUDIT_MIGRATIONS, service="audit")
    SqliteAuditStore(first.database, first.keyring).append(audit_events(100), time.time())
    first.database.close()
    opened = open_db(path, NEW, AUDIT_MIGRATIONS, OLD, service="audit")
    store = SqliteAuditStore(opened.database, opened.keyring)
    after, batches = 0, 0
    while store.remaining() and batches < 50:
        # more events arrive between two batches than one batch re-links
        store.append(audit_events(15, start=1000 + 15 * batches), time.time())
        after, _ = store.rotate_batch(after, 10)
        batches += 1
    assert store.remaining() == 0, "the rotation chased the head and never closed"
    result = store.verify()
    assert (result.ok, result.checked) == (True, 100 + 15 * batches)
    opened.database.close()


def test_audit_rotation_refuses_to_relink_a_tampered_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    first = open_db(path, OLD, AUDIT_MIGRATIONS, service="audit")
    SqliteAuditStore(first.database, first.keyring).append(audit_events(5), time.time())
    with first.database.write() as conn:
        conn.execute("UPDATE audit_events SET action = 'user_logout' WHERE sequence = 3")
    first.database.close()
    opened = open_db(path, NEW, AUDIT_MIGRATIONS, OLD, service="audit")
    store = SqliteAuditStore(opened.database, opened.keyring)
    with pytest.raises(IntegrityError):
        store.rotate_batch(0, 10)
    assert store.verify().first_bad_sequence == 3  # nothing was laundered
    opened.database.close()


def read_database_files(path: Path) -> bytes:
    """The main file and its live WAL, as someone copying them would get them."""
    files = [path, Path(f"{path}-wal")]
    return b"".join(f.read_bytes() for f in files if f.exists())


async def test_no_old_key_ciphertext_is_left_in_the_file_or_its_wal_after_rotation(
    tmp_path: Path,
) -> None:
    # The review found old-key ciphertexts in the live WAL after "rotation complete".
    path = tmp_path / "identity.db"
    before = open_db(path, OLD, IDENTITY_MIGRATIONS)
    identity, _ = identity_on(before)
    for i in range(20):
        identity.register(registration(f"user{i:02}", UserKeys.generate(1)))
    with before.database.read() as conn:
        old = [bytes(r[0]) for r in conn.execute("SELECT alias_ct FROM users")]
    before.database.close()

    during = open_db(path, NEW, IDENTITY_MIGRATIONS, OLD)
    _, store = identity_on(during)
    outbox = SqliteOutbox(during.database, during.keyring, "identity")
    rotation = KeyRotation(
        during.database, during.keyring, [*store.rotatables(), outbox.rotatable()], None
    )
    await rotation.run()
    assert rotation.status().old_keys_retirable
    raw = await asyncio.to_thread(read_database_files, path)
    assert not [ct for ct in old if ct[5:] in raw]  # nonce and body of each old ciphertext
    during.database.close()


def test_an_altered_rotation_boundary_is_named_and_stops_the_rotation(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    first = open_db(path, OLD, AUDIT_MIGRATIONS, service="audit")
    SqliteAuditStore(first.database, first.keyring).append(audit_events(12), time.time())
    first.database.close()
    opened = open_db(path, NEW, AUDIT_MIGRATIONS, OLD, service="audit")
    store = SqliteAuditStore(opened.database, opened.keyring)
    store.rotate_batch(0, 5)  # half way: the boundary record says where the seam is
    assert store.verify().ok
    with opened.database.write() as conn:
        conn.execute("UPDATE audit_rotation SET boundary = boundary + 1")
    result = store.verify()
    assert (result.ok, result.problem) == (False, "the key rotation's boundary record was altered")
    with pytest.raises(IntegrityError):
        store.rotate_batch(5, 5)
    opened.database.close()
