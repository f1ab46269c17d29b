"""Moving an existing deployment: copy a service's SQLite file into its PostgreSQL database.

Rows are copied verbatim, ids, ciphertexts, blind indexes, row MACs, audit links and key
metadata included: the PostgreSQL columns are the SQLite ones (services/*/postgres_store.py),
every ciphertext's associated data names only the service, table, column, row key and key
version, and a row MAC covers the row's own values and id, so each still decrypts, each
MAC still holds and the audit chain still verifies. A file with rows not yet sealed (from
a release before row MACs) is refused: start the service on it once, which seals them.
Nothing is decrypted on the way, and no key version is created: the copied database is
unlocked by the same master key as the file.

The copy runs in one transaction: a failure leaves the target as empty as it was. The
source is opened read-only and must be unlocked by the key first, so a wrong key copies
nothing. Stop the service (or all writers) before copying; the file is not changed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from services.common.errors import StartupError
from services.common.postgres.keys import BASE_SCHEMA
from services.common.schema import Migration
from services.common.sqlite import check_unlocks

# The key metadata first, then each service's tables, parents before children.
KEY_TABLES = ("key_versions", "key_retirements")
OUTBOX_TABLES = ("audit_outbox", "audit_outbox_numbering")
SERVICE_TABLES = {
    "identity": (
        "users",
        "one_time_prekeys",
        "factors",
        "password_decoy",
        "recovery_codes",
        "pending_revocations",
        *OUTBOX_TABLES,
    ),
    "session": ("sessions", *OUTBOX_TABLES),
    "audit": ("audit_events", "audit_head", "audit_rotation"),
}
# Tables that the PostgreSQL migrations seed with a row the copy replaces (when the file
# has one: SQLite writes the audit head with the first event).
SEEDED = ("audit_head", "password_decoy")
# SQLite's own bookkeeping, not data: the schema version is PostgreSQL's own.
NOT_COPIED = ("securemsg_schema",)
BATCH_ROWS = 2000

Progress = Callable[[int, int], None]  # (rows copied, rows in total)


def copy_sqlite_to_postgres(
    source: Path,
    url: str,
    *,
    service: str,
    master_key: str,
    migrations: Sequence[Migration],
    progress: Progress | None = None,
) -> int:
    """Copies every row of `source` into the empty database at `url`; returns the count."""
    check_unlocks(source, master_key)  # the right key, an intact file
    tables = (*KEY_TABLES, *SERVICE_TABLES[service])
    reader = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    with closing(reader), psycopg.connect(url, connect_timeout=10) as target:
        present = {
            row[0] for row in reader.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        unknown = sorted(present - {*tables, *NOT_COPIED} - _internal(present))
        if unknown:
            raise StartupError(
                f"the file has tables this release does not copy ({', '.join(unknown)}); "
                "copying would drop them. Nothing was copied"
            )
        totals = {
            t: int(reader.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0])  # noqa: S608
            for t in tables
            if t in present
        }
        total, done = sum(totals.values()), 0
        with target.transaction():
            _create_empty_schema(target, migrations)
            for table in tables:
                if table not in totals:
                    continue
                _check_columns(reader, target, table)
                if table in SEEDED and totals[table]:
                    target.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(table)))
                done = _copy_table(reader, target, table, done, total, progress)
                _check_sealed(target, table)
            _reset_identities(target, tables)
    if progress:
        progress(done, total)
    return done


def _internal(tables: set[str]) -> set[str]:
    return {t for t in tables if t.startswith("sqlite_")}


def _create_empty_schema(
    conn: psycopg.Connection[TupleRow], migrations: Sequence[Migration]
) -> None:
    existing = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
    if existing and existing[0]:
        raise StartupError(
            "the target database is not empty; copy into a freshly provisioned database"
        )
    conn.execute(BASE_SCHEMA)
    for migration in migrations:
        conn.execute(migration.sql)
    conn.execute("UPDATE securemsg_schema SET version = %s WHERE id = 1", (migrations[-1].version,))


def _check_columns(
    reader: sqlite3.Connection, target: psycopg.Connection[TupleRow], table: str
) -> None:
    """Refuses a table whose SQLite columns the PostgreSQL layout does not all have:
    dropping one (a row MAC, say) would silently remove what it protects."""
    source = {row[1] for row in reader.execute(f"PRAGMA table_info({table})")}
    have = {
        row[0]
        for row in target.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name = %s",
            (table,),
        )
    }
    missing = sorted(source - have)
    if missing:
        raise StartupError(
            f"{table} has columns the PostgreSQL layout of this release lacks "
            f"({', '.join(missing)}); copying would drop them. Nothing was copied"
        )


def _check_sealed(target: psycopg.Connection[TupleRow], table: str) -> None:
    """Refuses rows without a MAC in a table that has them: on PostgreSQL they would read
    as tampered (SQLite seals such rows once, when the service opens the file)."""
    has_mac = target.execute(
        "SELECT 1 FROM information_schema.columns"
        " WHERE table_schema = 'public' AND table_name = %s AND column_name = 'row_mac'",
        (table,),
    ).fetchone()
    if not has_mac:
        return
    unsealed = target.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE row_mac IS NULL").format(sql.Identifier(table))
    ).fetchone()
    if unsealed and unsealed[0]:
        raise StartupError(
            f"{table} has {unsealed[0]} rows without a MAC (written before row MACs): start "
            "the service on the file once with this release, which seals them, then copy. "
            "Nothing was copied"
        )


def _copy_table(
    reader: sqlite3.Connection,
    target: psycopg.Connection[TupleRow],
    table: str,
    done: int,
    total: int,
    progress: Progress | None,
) -> int:
    cursor = reader.execute(f"SELECT * FROM {table}")  # noqa: S608 - fixed table names
    columns = [d[0] for d in cursor.description]
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    with target.cursor().copy(statement) as copy:
        while rows := cursor.fetchmany(BATCH_ROWS):
            for row in rows:
                copy.write_row(row)
            done += len(rows)
            if progress:
                progress(done, total)
    return done


def _reset_identities(conn: psycopg.Connection[TupleRow], tables: Sequence[str]) -> None:
    """Identity columns continue after the copied ids."""
    identities = conn.execute(
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = 'public' AND is_identity = 'YES'"
    ).fetchall()
    for table, column in identities:
        if table not in tables:
            continue
        conn.execute(
            sql.SQL(
                "SELECT setval(pg_get_serial_sequence({table}, {column}),"
                " COALESCE((SELECT max({id}) FROM {name}), 0) + 1, false)"
            ).format(
                table=sql.Literal(table),
                column=sql.Literal(column),
                id=sql.Identifier(column),
                name=sql.Identifier(table),
            )
        )
