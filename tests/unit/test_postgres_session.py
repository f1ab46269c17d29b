"""Sessions on PostgreSQL: two replicas (two pools) on one database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.common.errors import Unauthenticated
from services.common.postgres.database import PoolSettings
from services.common.postgres.keys import open_pg_database
from services.common.postgres.outbox import PgOutbox
from services.session import postgres_store
from services.session.model import NoSuchSession
from services.session.postgres_store import PostgresSessionStore
from services.session.sessions import SessionPolicy, Sessions
from tests.support.postgres import PostgresServer
from tests.unit.conftest import FakeClock

POLICY = SessionPolicy(idle_timeout=1800, max_lifetime=12 * 3600)


class Replica:
    def __init__(self, url: str, clock: FakeClock) -> None:
        opened = open_pg_database(
            url,
            service="session",
            master_key="unit test master key",
            kdf_iterations=100_000,
            migrations=postgres_store.MIGRATIONS,
            settings=PoolSettings(size=4),
        )
        self.database = opened.database
        outbox = PgOutbox(opened.database, opened.keyring, "session", "replica")
        self.store = PostgresSessionStore(opened.database, opened.keyring, outbox)
        self.sessions = Sessions(self.store, POLICY, clock)


@pytest.fixture
def replicas(postgres: PostgresServer) -> Iterator[tuple[Replica, Replica, FakeClock]]:
    url = postgres.service_database("session")
    clock = FakeClock()
    a, b = Replica(url, clock), Replica(url, clock)
    yield a, b, clock
    a.database.close()
    b.database.close()


def test_a_token_issued_by_one_replica_validates_on_the_other(
    replicas: tuple[Replica, Replica, FakeClock],
) -> None:
    a, b, _ = replicas
    token, record = a.sessions.create("alice", "10.0.0.1", "phone")
    assert b.sessions.validate(token).session_id == record.session_id
    assert b.sessions.revoke_user("alice") == 1
    with pytest.raises(Unauthenticated):
        a.sessions.validate(token)


def test_sliding_never_moves_a_deadline_back(replicas: tuple[Replica, Replica, FakeClock]) -> None:
    a, b, clock = replicas
    _, record = a.sessions.create("alice", "10.0.0.1", "phone")
    later = record.expire_time + 600
    a.store.set_expiry(record.session_id, later)
    b.store.set_expiry(record.session_id, record.expire_time)  # b acts on an older read
    sessions = b.store.for_user("alice", clock.now)
    assert [s.expire_time for s in sessions] == [later]


def test_a_session_id_with_nul_names_no_session(
    replicas: tuple[Replica, Replica, FakeClock],
) -> None:
    """PostgreSQL text cannot hold NUL: such ids must behave as unknown ones (as on
    SQLite), not fail the statement (seen by the fuzz test as INTERNAL)."""
    a, _, _ = replicas
    a.sessions.create("alice", "10.0.0.1", "phone")
    with pytest.raises(NoSuchSession):
        a.store.set_expiry("\x00", 1.0)
    assert a.store.delete_user("alice", lambda _: None, keep_session_id="\x00") == 1
