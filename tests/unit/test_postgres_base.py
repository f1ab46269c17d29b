"""The PostgreSQL base: opening, key versions in the database, the write guard, leases,
role separation, and failing fast (then recovering) when the server goes away."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from services.common.config import Env
from services.common.errors import StartupError, Unavailable
from services.common.postgres.config import PostgresConfig
from services.common.postgres.database import PoolSettings
from services.common.postgres.keys import OpenedPgDatabase, open_pg_database, retire_versions
from services.common.postgres.lease import Lease, LeaseLost
from services.common.schema import Migration
from tests.support.postgres import PostgresServer, running_server

MIGRATIONS = [Migration(1, "CREATE TABLE notes (id bigint PRIMARY KEY, body bytea NOT NULL);")]
KEY = "a sufficiently long key"
FAST = PoolSettings(size=2, pool_timeout=1.0, statement_timeout=2.0, lock_timeout=1.0)


def open_notes(
    url: str,
    key: str = KEY,
    *,
    old: tuple[str, ...] = (),
    migrations: list[Migration] | None = None,
) -> OpenedPgDatabase:
    return open_pg_database(
        url,
        service="test",
        master_key=key,
        kdf_iterations=100_000,
        migrations=migrations or MIGRATIONS,
        old_keys=old,
        settings=FAST,
    )


@pytest.fixture
def url(postgres: PostgresServer) -> str:
    return postgres.service_database("notes")


def everything(url: str) -> list[object]:
    """Every row of every table, to show that something was left untouched."""
    with psycopg.connect(url) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
            )
        ]
        return [(t, conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()) for t in tables]


def test_every_replica_derives_the_same_keys_from_the_database(url: str) -> None:
    first, second = open_notes(url), open_notes(url)
    cipher = first.keyring.field("notes", "body")
    with first.database.write() as conn:
        conn.execute(
            "INSERT INTO notes (id, body) VALUES (1, %s)", (cipher.encrypt_text("hi", b"1"),)
        )
    with second.database.read(snapshot=False) as conn:
        blob = conn.execute("SELECT body FROM notes WHERE id = 1").fetchone()
    assert blob is not None
    assert second.keyring.field("notes", "body").decrypt_text(blob["body"], b"1") == "hi"
    with first.database.read() as conn:
        versions = conn.execute("SELECT count(*) AS n FROM key_versions").fetchone()
    assert versions is not None
    assert versions["n"] == 1
    first.database.close()
    second.database.close()


def test_replicas_starting_at_once_record_one_key_version(url: str) -> None:
    opened: list[OpenedPgDatabase] = []
    threads = [threading.Thread(target=lambda: opened.append(open_notes(url))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(opened) == 4
    assert {o.keyring.primary_version for o in opened} == {1}
    for o in opened:
        o.database.close()


def test_a_wrong_key_refuses_to_start_and_changes_nothing(url: str) -> None:
    open_notes(url).database.close()
    before = everything(url)
    later = [*MIGRATIONS, Migration(2, "CREATE TABLE more (id bigint PRIMARY KEY);")]
    with pytest.raises(StartupError, match="does not unlock"):
        open_notes(url, "another long enough key", migrations=later)
    assert everything(url) == before  # no migration, no key version


def test_a_failed_write_block_rolls_back(url: str) -> None:
    opened = open_notes(url)

    def failing_write() -> None:
        with opened.database.write() as conn:
            conn.execute("INSERT INTO notes (id, body) VALUES (1, '\\x00')")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        failing_write()
    with opened.database.read(snapshot=False) as conn:
        row = conn.execute("SELECT count(*) AS n FROM notes").fetchone()
    assert row is not None
    assert row["n"] == 0
    opened.database.close()


def test_a_replica_with_an_outdated_key_refuses_to_write(url: str) -> None:
    old = open_notes(url)
    rotated = open_notes(url, "the brand new primary key", old=(KEY,))
    assert rotated.keyring.primary_version == 2
    with (
        pytest.raises(Unavailable, match="outdated database key"),
        old.database.write() as conn,
    ):
        conn.execute("INSERT INTO notes (id, body) VALUES (1, '\\x00')")
    with rotated.database.write() as conn:
        conn.execute("INSERT INTO notes (id, body) VALUES (1, '\\x00')")
    old.database.close()
    rotated.database.close()


def test_a_retired_key_no_longer_starts(url: str) -> None:
    open_notes(url).database.close()
    rotated = open_notes(url, "the brand new primary key", old=(KEY,))
    assert retire_versions(rotated.database, keep=2) == [1]
    rotated.database.close()
    with pytest.raises(StartupError, match="retired"):
        open_notes(url)
    open_notes(url, "the brand new primary key").database.close()


def test_a_lease_has_one_holder_until_it_expires(url: str) -> None:
    opened = open_notes(url)
    a = Lease(opened.database, "outbox", "replica-a", ttl=0.5)
    b = Lease(opened.database, "outbox", "replica-b", ttl=0.5)
    assert a.acquire()
    assert not b.acquire()
    assert a.acquire()  # renewing
    assert a.holder_now() == "replica-a"
    time.sleep(0.6)  # a died without renewing
    assert b.acquire()
    assert not a.acquire()
    with pytest.raises(LeaseLost), opened.database.write() as conn:
        a.hold_in(conn)
    with opened.database.write() as conn:
        b.hold_in(conn)
    b.release()
    assert a.acquire()
    opened.database.close()


def test_a_service_role_cannot_open_another_services_database(postgres: PostgresServer) -> None:
    identity = psycopg.conninfo.conninfo_to_dict(postgres.service_database("identity"))
    session_url = postgres.service_database("session")
    session = psycopg.conninfo.conninfo_to_dict(session_url)
    with psycopg.connect(session_url) as conn:
        conn.execute("CREATE TABLE sessions (id bigint)")
    intruder = psycopg.conninfo.make_conninfo(  # identity's role and password, session's db
        **{**identity, "dbname": session["dbname"]}  # type: ignore[arg-type]
    )
    with pytest.raises(psycopg.OperationalError, match="permission denied"):
        psycopg.connect(intruder, connect_timeout=5)


def test_database_url_comes_from_the_environment_or_a_file(tmp_path: Path) -> None:
    assert PostgresConfig.from_env(Env({})) is None
    secret = tmp_path / "url"
    secret.write_text("postgresql://identity:pw@db:5432/identity\n")
    config = PostgresConfig.from_env(Env({"DATABASE_URL_FILE": str(secret)}))
    assert config is not None
    assert config.url.endswith("/identity")
    with pytest.raises(StartupError, match=r"postgresql:// URL"):
        PostgresConfig.from_env(Env({"DATABASE_URL": "mysql://x"}))
    with pytest.raises(StartupError) as refused:
        PostgresConfig.from_env(Env({"DATABASE_URL": "postgresql://u:secret@h/d?bad=1"}))
    assert "secret" not in str(refused.value)


def test_an_unreachable_database_refuses_to_start_without_hanging(
    postgres: PostgresServer,
) -> None:
    started = time.monotonic()
    with pytest.raises(StartupError, match="cannot reach the test database"):
        open_notes(f"postgresql://nobody@127.0.0.1:{postgres.port + 1 or 1}/none")
    assert time.monotonic() - started < 10


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A private server this test may stop and start."""
    with running_server() as server:
        if not server.private:
            pytest.fail(
                "this test stops the server: it needs a private one (unset TEST_POSTGRES_URL)"
            )
        yield server


def test_a_stopped_server_gives_unavailable_fast_then_service_resumes(
    own_server: PostgresServer,
) -> None:
    opened = open_notes(own_server.service_database("notes"))
    with opened.database.write() as conn:
        conn.execute("INSERT INTO notes (id, body) VALUES (1, '\\x00')")
    own_server.halt()
    for _ in range(3):
        started = time.monotonic()
        with pytest.raises(Unavailable), opened.database.read(snapshot=False) as conn:
            conn.execute("SELECT count(*) FROM notes")
        assert time.monotonic() - started < 4, "a call must fail fast, not hang"
    own_server.resume()
    deadline = time.monotonic() + 20
    while True:  # no restart: the pool reconnects by itself
        try:
            with opened.database.write() as conn:
                conn.execute("INSERT INTO notes (id, body) VALUES (2, '\\x00')")
            break
        except Unavailable:
            assert time.monotonic() < deadline, "the service did not recover"
            time.sleep(0.2)
    with opened.database.read(snapshot=False) as conn:
        row = conn.execute("SELECT count(*) AS n FROM notes").fetchone()
    assert row is not None
    assert row["n"] == 2
    opened.database.close()
