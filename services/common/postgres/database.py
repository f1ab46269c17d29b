"""PostgreSQL base for the persistent services: a connection pool and explicit transactions.

Stores run in worker threads (`asyncio.to_thread`), so the pool is psycopg's synchronous
one, sized to those threads: a thread never waits for a connection while the database is
healthy, and a wait that does happen means the database is unreachable.

Failure modes map to the domain's errors, so a client sees a status it can act on:

- the database unreachable, restarting, or too slow (connection refused or lost, pool
  wait, connect, statement or lock timeout, admin shutdown) -> `Unavailable`, after at
  most a few seconds, never a hang; broken connections are replaced in the background,
  so service resumes by itself when the database returns;
- a full disk -> `ResourceExhausted`, as on SQLite;
- this replica's primary key version older than the database's (a newer replica rotated
  the key) -> `Unavailable` on every write, so a stale replica cannot write data that the
  others cannot find (see `KeyVersionGuard`).

Connections run in autocommit mode: a point read is one round trip; `write()` and
`read()` open a real transaction with BEGIN/COMMIT.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg_pool
from psycopg import errors as pg_errors
from psycopg.rows import dict_row

from services.common.errors import InvalidArgument, ResourceExhausted, ServiceError, Unavailable

logger = logging.getLogger(__name__)

Connection = psycopg.Connection[dict[str, Any]]

UNREACHABLE = (
    "the service's database is unreachable or too slow; nothing was changed. Retry in a few seconds"
)


@dataclass(frozen=True)
class PoolSettings:
    """How long to wait before answering UNAVAILABLE, and how many connections."""

    size: int
    connect_timeout: float = 2.0  # libpq's smallest effective value
    pool_timeout: float = 2.0
    statement_timeout: float = 5.0
    lock_timeout: float = 3.0

    @staticmethod
    def default_size() -> int:
        """asyncio.to_thread's default executor size: one connection per worker thread."""
        return min(32, (os.cpu_count() or 1) + 4)


def connection_options(settings: PoolSettings) -> dict[str, Any]:
    """libpq parameters that bound every wait on the database."""
    return {
        "autocommit": True,
        "row_factory": dict_row,
        "connect_timeout": max(2, round(settings.connect_timeout)),
        # A peer that vanished without closing the socket is noticed in seconds.
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 2,
        "tcp_user_timeout": int(settings.statement_timeout * 1000),
        "application_name": "securemsg",
        "options": (
            f"-c statement_timeout={int(settings.statement_timeout * 1000)}"
            f" -c lock_timeout={int(settings.lock_timeout * 1000)}"
            " -c idle_in_transaction_session_timeout=30000"
            " -c timezone=UTC"
        ),
    }


class KeyVersionGuard:
    """Refuses writes from a replica whose primary key version is no longer the newest.

    The check is one statement at the start of each write transaction. Adding a key
    version takes an ACCESS EXCLUSIVE lock on `key_versions` (see keys.py), which waits for
    every write transaction that has read it and holds back new ones until the version is
    committed: no write can slip through under the old version unnoticed.
    """

    def __init__(self, primary_version: int) -> None:
        self.primary_version = primary_version

    def check(self, conn: Connection) -> None:
        row = conn.execute("SELECT max(version) AS newest FROM key_versions").fetchone()
        newest = int(row["newest"]) if row and row["newest"] is not None else 0
        if newest > self.primary_version:
            logger.error(
                "database key is newer than this replica's",
                extra={"fields": {"replica": self.primary_version, "database": newest}},
            )
            raise Unavailable(
                "this replica runs with an outdated database key and refuses to write; "
                "retry (other replicas serve) while an operator restarts it with the "
                "current DB_ENCRYPTION_KEY"
            )


class PgDatabase:
    """A pool of connections to one service's database, with explicit transactions."""

    def __init__(self, pool: psycopg_pool.ConnectionPool[Connection], name: str) -> None:
        self._pool = pool
        self.name = name
        self.guard: KeyVersionGuard | None = None  # set once the keyring is unlocked

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        """A pooled connection in autocommit mode; errors become domain errors."""
        with translate_errors(), self._pool.connection() as conn:
            yield conn

    @contextmanager
    def write(self, *, guard: bool = True) -> Iterator[Connection]:
        """A READ COMMITTED transaction, committed when the block ends, rolled back on error.

        The key-version guard runs first, so a stale replica writes nothing (`guard=False`
        for a transaction that writes nothing sealed, only deletes, say).
        """
        with self.connection() as conn:
            conn.execute("BEGIN")
            try:
                if guard and self.guard is not None:
                    self.guard.check(conn)
                yield conn
            except BaseException:
                _rollback(conn)
                raise
            conn.execute("COMMIT")

    @contextmanager
    def read(self, *, snapshot: bool = True) -> Iterator[Connection]:
        """A read-only transaction seeing one snapshot; `snapshot=False` for one statement
        (autocommit: a single statement is atomic on its own, and saves two round trips)."""
        with self.connection() as conn:
            if not snapshot:
                yield conn
                return
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                yield conn
            finally:
                _rollback(conn)

    def close(self) -> None:
        self._pool.close()


def _rollback(conn: Connection) -> None:
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.UNKNOWN:
        try:
            conn.execute("ROLLBACK")
        except psycopg.Error:
            logger.warning("rollback failed; the connection is discarded")


@contextmanager
def translate_errors() -> Iterator[None]:
    """Database failures as the domain's errors (see the module docstring)."""
    try:
        yield
    except ServiceError:
        raise
    except psycopg_pool.PoolTimeout:
        logger.warning("no database connection within the pool timeout")
        raise Unavailable(UNREACHABLE) from None
    except psycopg.DataError as exc:
        # A value PostgreSQL cannot hold (text with NUL, say) reached a statement: bad
        # input the stores did not catch, not an internal failure.
        logger.warning("value not storable", extra={"fields": {"error": type(exc).__name__}})
        raise InvalidArgument(
            "a field holds a value that cannot be stored (NUL characters are not allowed)"
        ) from None
    except pg_errors.DiskFull:
        raise ResourceExhausted(
            "the service's storage is full; nothing was written. An operator must free "
            "space and the request can be retried"
        ) from None
    except (pg_errors.OperationalError, psycopg.InterfaceError) as exc:
        # Connection lost or refused, admin shutdown, statement/lock timeout, deadlock,
        # serialization failure: all transient from the client's point of view.
        logger.warning(
            "database unavailable",
            extra={"fields": {"error": type(exc).__name__, "sqlstate": exc.sqlstate or ""}},
        )
        raise Unavailable(UNREACHABLE) from None


def open_pool(url: str, settings: PoolSettings, name: str) -> PgDatabase:
    """Opens the pool and waits for its first connection (or raises Unavailable)."""
    pool: psycopg_pool.ConnectionPool[Connection] = psycopg_pool.ConnectionPool(
        url,
        kwargs=connection_options(settings),
        min_size=settings.size,
        max_size=settings.size,
        timeout=settings.pool_timeout,
        # A connection broken while idle (the server restarted) is replaced at checkout
        # instead of failing the first request after the server returns.
        check=psycopg_pool.ConnectionPool.check_connection,
        # Keep trying to reconnect for as long as the database is away.
        reconnect_timeout=24 * 3600.0,
        name=name,
        open=False,
    )
    pool.open(wait=False)
    return PgDatabase(pool, name)
