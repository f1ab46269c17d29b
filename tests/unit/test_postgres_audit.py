"""The audit log on PostgreSQL: two replicas append at once and the chain stays gapless;
key rotation closes under steady appends; an altered rotation boundary is reported."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest

from services.audit import postgres_store
from services.audit.model import NewEvent
from services.audit.postgres_store import PostgresAuditStore
from services.common.postgres.database import PgDatabase, PoolSettings
from services.common.postgres.keys import open_pg_database
from tests.support.postgres import PostgresServer

KEY, NEW_KEY = "unit test master key", "the next master key"


def replica(
    url: str, key: str = KEY, old: tuple[str, ...] = ()
) -> tuple[PgDatabase, PostgresAuditStore]:
    opened = open_pg_database(
        url,
        service="audit",
        master_key=key,
        kdf_iterations=100_000,
        migrations=postgres_store.MIGRATIONS,
        old_keys=old,
        settings=PoolSettings(size=4),
    )
    return opened.database, PostgresAuditStore(opened.database, opened.keyring)


def event(event_id: str, user_id: str = "alice") -> NewEvent:
    return NewEvent(event_id, "user_login", "session", user_id, 1000.0, {"ip": "10.0.0.1"})


@pytest.fixture
def url(postgres: PostgresServer) -> str:
    return postgres.service_database("audit")


@pytest.fixture
def stores(url: str) -> Iterator[tuple[PostgresAuditStore, PostgresAuditStore]]:
    (db_a, a), (db_b, b) = replica(url), replica(url)
    yield a, b
    db_a.close()
    db_b.close()


def test_appends_through_two_replicas_keep_one_gapless_verifiable_chain(
    stores: tuple[PostgresAuditStore, PostgresAuditStore], url: str
) -> None:
    def append(worker: int) -> None:
        for batch in range(10):
            events = [event(f"w{worker}-b{batch}-{i}", f"user{worker}") for i in range(5)]
            stores[worker % 2].append(events, 2000.0)

    threads = [threading.Thread(target=append, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result = stores[1].verify()
    assert result.ok, result.problem
    assert result.checked == result.total == 8 * 10 * 5
    with psycopg.connect(url) as conn:
        sequences = [r[0] for r in conn.execute("SELECT sequence FROM audit_events ORDER BY 1")]
    assert sequences == list(range(1, 401))


def test_a_batch_sent_to_both_replicas_is_stored_once(
    stores: tuple[PostgresAuditStore, PostgresAuditStore],
) -> None:
    batch = [event(f"e{i}") for i in range(20)]
    results: list[tuple[int, int]] = []
    threads = [
        threading.Thread(target=lambda s=s: results.append(s.append(batch, 2000.0))) for s in stores
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [(0, 20), (20, 0)]
    assert stores[0].counts() == {"user_login": 20}
    assert stores[0].verify().ok


def test_tampering_is_found_at_its_position(
    stores: tuple[PostgresAuditStore, PostgresAuditStore], url: str
) -> None:
    stores[0].append([event(f"e{i}") for i in range(10)], 2000.0)
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE audit_events SET action = 'user_logout' WHERE sequence = 4")
    result = stores[1].verify()
    assert (result.ok, result.first_bad_sequence) == (False, 4)


def test_rotation_finishes_while_appends_outpace_each_batch(url: str) -> None:
    db, before = replica(url)
    before.append([event(f"e{i}") for i in range(100)], 2000.0)
    db.close()
    db, store = replica(url, NEW_KEY, (KEY,))
    after, batches = 0, 0
    while store.remaining() and batches < 50:
        # more events arrive between two batches than one batch re-links
        store.append([event(f"n{batches}-{i}") for i in range(15)], 2000.0)
        after, _ = store.rotate_batch(after, 10)
        batches += 1
    assert store.remaining() == 0, "the rotation chased the head and never closed"
    result = store.verify()
    assert (result.ok, result.checked) == (True, 100 + 15 * batches)
    db.close()


def test_an_altered_rotation_boundary_is_reported(url: str) -> None:
    db, before = replica(url)
    before.append([event(f"e{i}") for i in range(30)], 2000.0)
    db.close()
    db, store = replica(url, NEW_KEY, (KEY,))
    store.rotate_batch(0, 10)  # a rotation under way: events 1-10 re-linked
    assert store.verify().ok
    with psycopg.connect(url) as conn:  # moving the boundary would hide a re-linked forgery
        conn.execute("UPDATE audit_rotation SET boundary = 5")
    result = store.verify()
    assert not result.ok
    assert result.problem == "the key rotation's boundary record was altered"
    db.close()
