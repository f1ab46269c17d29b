"""Identity on PostgreSQL: two replicas (two pools) on one database, the outbox shipped
under a lease."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.client.keys import UserKeys
from services.common import audit_events
from services.common.audit_events import AuditRecord
from services.common.errors import AlreadyExists
from services.common.postgres.database import PoolSettings
from services.common.postgres.keys import open_pg_database
from services.common.postgres.outbox import PgOutbox
from services.identity import postgres_store
from services.identity.domain import Identity
from services.identity.postgres_store import PostgresIdentityStore
from tests.fakes.identity import RecordingRevoker
from tests.support.postgres import PostgresServer
from tests.unit.conftest import FakeClock, registration

KEY = "unit test master key"


class Replica:
    """One identity process's storage: its own pool, outbox and store."""

    def __init__(self, url: str, name: str, key: str = KEY) -> None:
        opened = open_pg_database(
            url,
            service="identity",
            master_key=key,
            kdf_iterations=100_000,
            migrations=postgres_store.MIGRATIONS,
            settings=PoolSettings(size=8),
        )
        self.database, self.keyring = opened.database, opened.keyring
        self.outbox = PgOutbox(opened.database, opened.keyring, "identity", name)
        self.store = PostgresIdentityStore(opened.database, opened.keyring, self.outbox)
        self.identity = Identity(self.store, RecordingRevoker(), FakeClock())

    def close(self) -> None:
        self.database.close()


@pytest.fixture
def url(postgres: PostgresServer) -> str:
    return postgres.service_database("identity")


@pytest.fixture
def replicas(url: str) -> Iterator[tuple[Replica, Replica]]:
    a, b = Replica(url, "a"), Replica(url, "b")
    yield a, b
    a.close()
    b.close()


def test_a_prekey_is_handed_out_at_most_once_across_replicas(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    a.identity.register(registration("alice", UserKeys.generate(100)))
    with ThreadPoolExecutor(16) as pool:
        handed = list(
            pool.map(lambda i: replicas[i % 2].identity.bundle("alice").one_time_prekey, range(130))
        )
    ids = [k.key_id for k in handed if k is not None]
    assert len(ids) == len(set(ids)) == 100  # distinct, and conserved: 100 uploaded
    assert b.identity.profile("alice").one_time_prekey_count == 0


def test_one_registration_wins_across_replicas(replicas: tuple[Replica, Replica]) -> None:
    start = threading.Barrier(8)
    outcomes: list[str] = []

    def register(i: int) -> None:
        start.wait()
        try:
            replicas[i % 2].identity.register(registration("bob", UserKeys.generate(1)))
            outcomes.append("ok")
        except AlreadyExists:
            outcomes.append("taken")

    threads = [threading.Thread(target=register, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["ok"] + ["taken"] * 7
    assert replicas[0].store.counts().registered == 1
    assert replicas[1].outbox.backlog() == 1  # one audit event, for the winner only


def test_the_last_login_time_never_moves_back(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    a.identity.register(registration("carol", UserKeys.generate(0)))
    a.store.record_login("carol", 2000.0)
    b.store.record_login("carol", 1000.0)
    user = b.store.get_user("carol")
    assert user is not None
    assert user.last_login_time == 2000.0


def test_only_the_lease_holder_ships_the_outbox(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    for i in range(3):
        a.outbox.record(AuditRecord(audit_events.USER_REGISTERED, f"user-{i}", {}))
    first = a.outbox.peek(10)
    assert [event.user_id for _, event in first] == ["user-0", "user-1", "user-2"]
    assert b.outbox.peek(10) == []  # a holds the lease
    a.outbox.remove([row_id for row_id, _ in first[:2]])
    a.outbox.release()
    assert [event.user_id for _, event in b.outbox.peek(10)] == ["user-2"]


def test_outbox_events_of_both_replicas_are_numbered_gaplessly_in_shipping_order(
    replicas: tuple[Replica, Replica],
) -> None:
    """The audit service reports a producer's missing or rewound number (L6): events
    written through two replicas at once must come out 1, 2, 3, ... in outbox order."""

    def register(n: int) -> None:
        replicas[n % 2].identity.register(registration(f"user-{n}", UserKeys.generate(1)))

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(register, range(40)))
    shipped = [event for _, event in replicas[0].outbox.peek(100)]
    assert len({event.source_epoch for event in shipped}) == 1
    assert [event.source_sequence for event in shipped] == list(range(1, 41))
