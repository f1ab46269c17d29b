"""Operations on PostgreSQL: key rotation by one replica under a lease, backups through
pg_dump that restore only with the right key, and what a dump shows."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest

from services.client.keys import UserKeys
from services.common.errors import StartupError
from services.common.postgres.backup import PgBackupSource, check_dump_unlocks, restore_dump
from services.common.postgres.database import PoolSettings
from services.common.postgres.keys import open_pg_database, retire_versions
from services.common.postgres.lease import Lease
from services.common.postgres.outbox import PgOutbox
from services.common.postgres.rotation import LeasedRotation
from services.common.rotation import KeyRotation
from services.identity import postgres_store
from services.identity.domain import Identity
from services.identity.postgres_store import PostgresIdentityStore
from tests.fakes.identity import RecordingRevoker
from tests.support.postgres import PostgresServer, client_tool
from tests.unit.conftest import FakeClock, registration

OLD, NEW = "the first master key", "the second master key"


class Replica:
    def __init__(self, url: str, key: str, old: tuple[str, ...] = (), name: str = "r") -> None:
        opened = open_pg_database(
            url,
            service="identity",
            master_key=key,
            kdf_iterations=100_000,
            migrations=postgres_store.MIGRATIONS,
            old_keys=old,
            settings=PoolSettings(size=4),
        )
        self.database, self.keyring = opened.database, opened.keyring
        self.outbox = PgOutbox(opened.database, opened.keyring, "identity", name)
        self.store = PostgresIdentityStore(opened.database, opened.keyring, self.outbox)
        self.identity = Identity(self.store, RecordingRevoker(), FakeClock())
        self.name = name

    def rotation(self) -> LeasedRotation:
        rotation = KeyRotation(
            None,
            self.keyring,
            [*self.store.rotatables(), self.outbox.rotatable()],
            None,
            batch_size=7,
            pause_seconds=0,
            retire=lambda keep: retire_versions(self.database, keep),
        )
        lease = Lease(self.database, "key-rotation", self.name, ttl=5)
        return LeasedRotation(rotation, lease, self.database, poll_seconds=0.05)

    def close(self) -> None:
        self.database.close()


@pytest.fixture
def url(postgres: PostgresServer) -> str:
    return postgres.service_database("identity")


def test_rotation_runs_on_one_replica_and_the_other_sees_it_finish(url: str) -> None:
    before = Replica(url, OLD)
    for i in range(20):
        before.identity.register(registration(f"user-{i}", UserKeys.generate(1)))
    before.close()
    a = Replica(url, NEW, (OLD,), name="a")
    b = Replica(url, NEW, (OLD,), name="b")
    rotation_a, rotation_b = a.rotation(), b.rotation()
    assert rotation_a.status().rows_remaining == 60  # 20 users, their 20 prekeys, 20 events

    async def both() -> None:
        await asyncio.gather(rotation_a.run(), rotation_b.run())

    asyncio.run(both())
    done = [rotation_a.status(), rotation_b.status()]
    assert all(s.old_keys_retirable and s.rows_remaining == 0 for s in done)
    assert sorted(s.rows_done for s in done) == [0, 60]  # one replica did all the work
    b.close()
    a.close()
    with pytest.raises(StartupError, match="retired"):
        Replica(url, OLD)
    after = Replica(url, NEW)  # the old key is no longer needed
    user = after.store.get_user("user-7")
    assert user is not None
    assert user.user_id == "user-7"
    after.close()


def test_a_backup_restores_only_with_its_key(
    url: str, postgres: PostgresServer, tmp_path: Path
) -> None:
    client_tool("pg_dump")  # fails with the install command when missing
    replica = Replica(url, OLD)
    replica.identity.register(registration("alice", UserKeys.generate(3), alias="Alice A."))
    dump = tmp_path / "identity.dump"
    source = PgBackupSource(replica.database, url)
    source.snapshot(dump)
    source.check(dump)
    replica.close()

    with pytest.raises(StartupError, match="does not unlock"):
        check_dump_unlocks(dump, NEW)
    target = postgres.service_database("identity")
    with pytest.raises(StartupError, match="does not unlock"):
        restore_dump(dump, target, NEW)
    with psycopg.connect(target) as conn:  # a refused restore wrote nothing
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        assert tables.fetchone() == (0,)
    restore_dump(dump, target, OLD)
    restored = Replica(target, OLD)
    user = restored.store.get_user("alice")
    assert user is not None
    assert (user.alias, user.one_time_prekey_count) == ("Alice A.", 3)
    restored.close()
    with pytest.raises(FileExistsError, match="not empty"):
        restore_dump(dump, target, OLD)
