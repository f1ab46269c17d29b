"""Every store implementation, built the same way for the shared store contract suite
(tests/unit/test_store_contract_*.py).

A backend builds each service's store on fresh storage and tells which audit events went
out with the changes (an outbox's content). Adding a backend (PostgreSQL) means one more
class here and one more entry in BACKENDS; every contract test then runs against it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from services.audit import postgres_store as audit_pg
from services.audit.model import AuditStore
from services.audit.store import MIGRATIONS as AUDIT_MIGRATIONS
from services.audit.store import SEALING as AUDIT_SEALING
from services.audit.store import SqliteAuditStore
from services.common.audit_events import AuditRecord
from services.common.outbox import Outbox, SqliteOutbox
from services.common.postgres.database import PoolSettings
from services.common.postgres.keys import OpenedPgDatabase, open_pg_database
from services.common.postgres.outbox import PgOutbox
from services.common.sqlite import Migration, OpenedDatabase, RowSealing, open_database
from services.identity import postgres_store as identity_pg
from services.identity.cache import CachedIdentityStore
from services.identity.factor_store import SqliteFactorStore
from services.identity.model import FactorStore, IdentityStore
from services.identity.postgres_factors import PostgresFactorStore
from services.identity.store import MIGRATIONS as IDENTITY_MIGRATIONS
from services.identity.store import SEALING as IDENTITY_SEALING
from services.identity.store import SqliteIdentityStore
from services.session import postgres_store as session_pg
from services.session.cache import CachedSessionStore
from services.session.model import SessionStore
from services.session.store import MIGRATIONS as SESSION_MIGRATIONS
from services.session.store import SEALING as SESSION_SEALING
from services.session.store import SqliteSessionStore
from tests.fakes.audit import MemoryAuditStore
from tests.fakes.identity import MemoryFactorStore, MemoryIdentityStore
from tests.fakes.session import MemorySessionStore
from tests.support.postgres import PostgresServer

S = TypeVar("S")
# What an audit event says, whichever way a backend keeps it: (action, user id, details).
Event = tuple[str, str, dict[str, str]]


@dataclass
class Harness(Generic[S]):
    store: S
    events: Callable[[], list[Event]]  # the audit events written with changes, in order


@dataclass(frozen=True)
class Place:
    """Where a backend may keep its storage during one test, and what it may use."""

    root: Path  # an empty directory of the test's own
    cleanup: contextlib.ExitStack  # closed after the test
    fixture: Callable[[str], Any]  # another pytest fixture by name (e.g. "postgres")


# A statement with `?` placeholders run on a store's own storage, committed at once (what
# someone who can write the database, but has no key, can do); the rows it returns.
Tamper = Callable[[str, Sequence[object]], list[tuple[Any, ...]]]


@dataclass
class FactorHarness:
    """Identity's factor store with the user store it shares its storage with."""

    store: FactorStore
    users: IdentityStore
    events: Callable[[], list[Event]]
    tamper: Tamper | None = None  # on backends that store rows (SQL_BACKENDS)


class Backend(Protocol):
    def identity(self) -> Harness[IdentityStore]: ...
    def factors(self) -> FactorHarness: ...
    def session(self) -> Harness[SessionStore]: ...
    def audit(self) -> AuditStore: ...


class MemoryBackend:
    """The in-memory fakes (tests/fakes) that domain unit tests run on."""

    def __init__(self, place: Place) -> None:
        pass

    def identity(self) -> Harness[IdentityStore]:
        store = MemoryIdentityStore()
        return Harness(
            store, lambda: [(e.action, e.user_id, dict(e.details)) for e in store.events]
        )

    def factors(self) -> FactorHarness:
        store = MemoryFactorStore()
        return FactorHarness(store, store.users, lambda: _record_events(store.events))

    def session(self) -> Harness[SessionStore]:
        store = MemorySessionStore()
        return Harness(
            store, lambda: [(e.action, e.user_id, dict(e.details)) for e in store.events]
        )

    def audit(self) -> AuditStore:
        return MemoryAuditStore()


class SqliteBackend:
    """The SQLite stores the services run on, each in its own encrypted file."""

    def __init__(self, place: Place) -> None:
        self._root = place.root
        self._cleanup = place.cleanup

    def _open(
        self, service: str, migrations: Sequence[Migration], sealing: RowSealing | None = None
    ) -> OpenedDatabase:
        opened = open_database(
            self._root / f"{service}.db",
            service=service,
            master_key="store contract test key",
            kdf_iterations=1_000,  # the contract is about storage, not key stretching
            migrations=migrations,
            synchronous="NORMAL",
            sealing=sealing,
        )
        self._cleanup.callback(opened.database.close)
        return opened

    def _outbox(self, opened: OpenedDatabase, service: str) -> SqliteOutbox:
        return SqliteOutbox(opened.database, opened.keyring, service)

    def identity(self) -> Harness[IdentityStore]:
        opened = self._open("identity", IDENTITY_MIGRATIONS, IDENTITY_SEALING)
        outbox = self._outbox(opened, "identity")
        store = SqliteIdentityStore(opened.database, opened.keyring, outbox)
        return Harness(store, lambda: _outbox_events(outbox))

    def factors(self) -> FactorHarness:
        opened = self._open("identity", IDENTITY_MIGRATIONS, IDENTITY_SEALING)
        outbox = self._outbox(opened, "identity")

        def tamper(sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
            with opened.database.write() as conn:
                return [tuple(row) for row in conn.execute(sql, tuple(params)).fetchall()]

        return FactorHarness(
            SqliteFactorStore(opened.database, opened.keyring, outbox),
            SqliteIdentityStore(opened.database, opened.keyring, outbox),
            lambda: _outbox_events(outbox),
            tamper,
        )

    def session(self) -> Harness[SessionStore]:
        opened = self._open("session", SESSION_MIGRATIONS, SESSION_SEALING)
        outbox = self._outbox(opened, "session")
        store = SqliteSessionStore(opened.database, opened.keyring, outbox)
        return Harness(store, lambda: _outbox_events(outbox))

    def audit(self) -> AuditStore:
        opened = self._open("audit", AUDIT_MIGRATIONS, AUDIT_SEALING)
        return SqliteAuditStore(opened.database, opened.keyring)


class CachedSqliteBackend(SqliteBackend):
    """The SQLite stores behind the per-process caches that the embedded default runs
    with (services/{identity,session}/cache.py): a cache must keep every store promise."""

    def identity(self) -> Harness[IdentityStore]:
        harness = super().identity()
        return Harness(CachedIdentityStore(harness.store), harness.events)

    def session(self) -> Harness[SessionStore]:
        harness = super().session()
        return Harness(CachedSessionStore(harness.store), harness.events)


class PostgresBackend:
    """The PostgreSQL stores, each service on its own database and role of the run's
    private server (the `postgres` fixture)."""

    def __init__(self, place: Place) -> None:
        self._server: PostgresServer = place.fixture("postgres")
        self._cleanup = place.cleanup

    def _open(self, service: str, migrations: Sequence[Migration]) -> OpenedPgDatabase:
        opened = open_pg_database(
            self._server.service_database(service),
            service=service,
            master_key="store contract test key",
            kdf_iterations=1_000,
            migrations=migrations,
            settings=PoolSettings(size=4),
        )
        self._cleanup.callback(opened.database.close)
        return opened

    def _outbox(self, opened: OpenedPgDatabase, service: str) -> PgOutbox:
        return PgOutbox(opened.database, opened.keyring, service, "contract")

    def identity(self) -> Harness[IdentityStore]:
        opened = self._open("identity", identity_pg.MIGRATIONS)
        outbox = self._outbox(opened, "identity")
        store = identity_pg.PostgresIdentityStore(opened.database, opened.keyring, outbox)
        return Harness(store, lambda: _outbox_events(outbox))

    def factors(self) -> FactorHarness:
        opened = self._open("identity", identity_pg.MIGRATIONS)
        outbox = self._outbox(opened, "identity")

        def tamper(sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
            with opened.database.write() as conn:
                cursor = conn.execute(sql.replace("?", "%s"), tuple(params))
                rows = cursor.fetchall() if cursor.description else []
                return [tuple(row.values()) for row in rows]

        return FactorHarness(
            PostgresFactorStore(opened.database, opened.keyring, outbox),
            identity_pg.PostgresIdentityStore(opened.database, opened.keyring, outbox),
            lambda: _outbox_events(outbox),
            tamper,
        )

    def session(self) -> Harness[SessionStore]:
        opened = self._open("session", session_pg.MIGRATIONS)
        outbox = self._outbox(opened, "session")
        store = session_pg.PostgresSessionStore(opened.database, opened.keyring, outbox)
        return Harness(store, lambda: _outbox_events(outbox))

    def audit(self) -> AuditStore:
        opened = self._open("audit", audit_pg.MIGRATIONS)
        return audit_pg.PostgresAuditStore(opened.database, opened.keyring)


def _record_events(records: list[AuditRecord]) -> list[Event]:
    return [(e.action, e.user_id, dict(e.details)) for e in records]


def _outbox_events(outbox: Outbox) -> list[Event]:
    return [(e.action, e.user_id, dict(e.details)) for _, e in outbox.peek(10_000)]


# The backends whose rows a test can edit behind the store's back (FactorHarness.tamper).
SQL_BACKENDS = ("sqlite", "postgres")

# Each contract test runs once per entry.
BACKENDS: dict[str, Callable[[Place], Backend]] = {
    "memory": MemoryBackend,
    "sqlite": SqliteBackend,
    "sqlite+cache": CachedSqliteBackend,
    "postgres": PostgresBackend,
}
