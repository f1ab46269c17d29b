"""Opening a service's PostgreSQL database: schema migrations and key versions.

The key metadata lives in the database, as on SQLite, so every replica derives the same
keys: `key_versions` (salt, iterations and key-check value of each master key generation)
and `key_retirements`. Opening follows "touch nothing unless the key is right": all of
it (schema migrations, a new key version) happens in one transaction that first checks
the keys and rolls back when they do not unlock the database.

Replicas starting together serialize on the `securemsg_schema` row (SELECT ... FOR
UPDATE), so one migrates and the others find the work done. Adding a key version also
takes an ACCESS EXCLUSIVE lock on `key_versions`, which the write guard relies on.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import tuple_row

from services.common import crypto
from services.common.errors import StartupError, Unavailable
from services.common.keyversions import Derivations, KeyRow, plan_unlock, sealed_level
from services.common.postgres.database import (
    Connection,
    KeyVersionGuard,
    PgDatabase,
    PoolSettings,
    open_pool,
)
from services.common.schema import Migration, check_numbering

logger = logging.getLogger(__name__)

# Created before anything else, outside the migration transaction (IF NOT EXISTS makes a
# replica starting at the same instant harmless; a lost race is retried).
BASE_SCHEMA = """
CREATE TABLE IF NOT EXISTS securemsg_schema (
    id      integer PRIMARY KEY CHECK (id = 1),
    version integer NOT NULL
);
INSERT INTO securemsg_schema (id, version) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS key_versions (
    version     integer          PRIMARY KEY,
    salt        bytea            NOT NULL,
    iterations  integer          NOT NULL,
    check_value bytea            NOT NULL,
    create_time double precision NOT NULL
);
CREATE TABLE IF NOT EXISTS key_retirements (
    version     integer          PRIMARY KEY,
    retire_time double precision NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    name   text             PRIMARY KEY,
    holder text             NOT NULL,
    until  double precision NOT NULL
);
"""


NOT_OURS = "the database has no key metadata; it is not a SecureMsg database"


@dataclass(frozen=True)
class PgRowSealing:
    """How rows written before a service's PostgreSQL layout had row MACs get them (see
    sqlite.RowSealing): `seal_legacy` runs once, in the opening transaction, then the
    key-check values record that rows are sealed (only the master key can write that
    variant), so a row without a MAC is an integrity failure from then on, and a database
    rewound to an older schema (to have tampered rows sealed again) is refused."""

    since: int
    seal_legacy: Callable[[Connection, crypto.Keyring], int]
    # Later upgrades that gave more tables MACs, in order (levels 2, 3, ...).
    later: Sequence[PgRowSealing] = ()

    @property
    def steps(self) -> list[PgRowSealing]:
        return [self, *self.later]


@dataclass(frozen=True)
class OpenedPgDatabase:
    database: PgDatabase
    keyring: crypto.Keyring


def open_pg_database(
    url: str,
    *,
    service: str,
    master_key: str,
    kdf_iterations: int,
    migrations: Sequence[Migration],
    old_keys: Sequence[str] = (),
    settings: PoolSettings | None = None,
    sealing: PgRowSealing | None = None,
) -> OpenedPgDatabase:
    """Connects, migrates, unlocks the keyring; see open_database (SQLite) for the rules.

    Raises StartupError, having changed nothing, when the keys do not unlock the database,
    its schema is newer than this release, or the database cannot be reached.
    """
    check_numbering(migrations)
    settings = settings or PoolSettings(size=PoolSettings.default_size())
    db = open_pool(url, settings, name=service)
    try:
        with db.connection() as conn:
            _create_base(conn)
            versions, primary = _migrate_and_unlock(
                conn, service, migrations, master_key, old_keys, kdf_iterations, sealing
            )
    except Unavailable:
        db.close()
        raise StartupError(
            f"cannot reach the {service} database (DATABASE_URL): check that PostgreSQL runs, "
            "the address, the role and its password"
        ) from None
    except BaseException:
        db.close()
        raise
    db.guard = KeyVersionGuard(primary)
    return OpenedPgDatabase(db, crypto.Keyring(service, versions, primary=primary))


def _create_base(conn: Connection) -> None:
    for attempt in range(10):
        try:
            with conn.transaction():
                conn.execute(BASE_SCHEMA)
            return
        except (pg_errors.UniqueViolation, pg_errors.DuplicateTable, pg_errors.DuplicateObject):
            time.sleep(0.05 * (attempt + 1))  # another replica created it this instant
        except pg_errors.InsufficientPrivilege:
            raise StartupError(
                "the database role may not create tables; give each service a role that "
                "owns its own database (see the README's PostgreSQL section)"
            ) from None
    raise StartupError("could not create the schema metadata table; retry")


def _migrate_and_unlock(
    conn: Connection,
    service: str,
    migrations: Sequence[Migration],
    master_key: str,
    old_keys: Sequence[str],
    kdf_iterations: int,
    sealing: PgRowSealing | None,
) -> tuple[list[crypto.KeyVersion], int]:
    primary = Derivations(master_key)
    olds = [Derivations(key) for key in old_keys if key != master_key]
    with conn.transaction():
        row = conn.execute(
            "SELECT version FROM securemsg_schema WHERE id = 1 FOR UPDATE"
        ).fetchone()
        current = int(row["version"]) if row else 0
        rows = _key_rows(conn)
        retired = {int(r["version"]) for r in conn.execute("SELECT version FROM key_retirements")}
        # Checked before anything is written: a wrong key rolls back an untouched database.
        known, loaded = (
            (None, {}) if not rows else plan_unlock("the database", rows, retired, primary, olds)
        )
        sealed = sealed_level(rows, loaded) if rows else 0
        latest = migrations[-1].version
        if current > latest:
            raise StartupError(
                f"the database has schema version {current}, newer than this release "
                f"understands ({latest}); run the newer release"
            )
        if sealing is not None and any(current < s.since for s in sealing.steps[:sealed]):
            raise StartupError(
                f"the database records that its rows carry MACs, but its schema (version "
                f"{current}) is from before them: someone who can write the database rewound "
                "it. Restore it from a backup; nothing was changed"
            )
        for migration in migrations:
            if migration.version > current:
                conn.execute(migration.sql)
        if current < latest:
            conn.execute("UPDATE securemsg_schema SET version = %s WHERE id = 1", (latest,))
        if known is None:  # a new database, or a new primary key: record its version
            conn.execute("LOCK TABLE key_versions IN ACCESS EXCLUSIVE MODE")
            newest = max((int(r[0]) for r in rows), default=0)
            known = _add_version(conn, primary, kdf_iterations, newest + 1, sealed=sealed)
            loaded[known.version] = known
            logger.info("key version added", extra={"fields": {"version": known.version}})
        if sealing is not None and sealed < len(sealing.steps):
            keyring = crypto.Keyring(service, list(loaded.values()), primary=known.version)
            count = sum(step.seal_legacy(conn, keyring) for step in sealing.steps[sealed:])
            _seal_versions(conn, list(loaded.values()), len(sealing.steps))
            if count:
                logger.warning(
                    "rows from before row MACs sealed as they are (once, at the upgrade)",
                    extra={"fields": {"rows": count}},
                )
    return list(loaded.values()), known.version


def _key_rows(conn: Connection) -> list[tuple[int, bytes, int, bytes]]:
    result = conn.execute(
        "SELECT version, salt, iterations, check_value FROM key_versions ORDER BY version"
    )
    return [
        (int(r["version"]), bytes(r["salt"]), int(r["iterations"]), bytes(r["check_value"]))
        for r in result
    ]


def _add_version(
    conn: Connection, derived: Derivations, iterations: int, version: int, *, sealed: int
) -> crypto.KeyVersion:
    salt = os.urandom(crypto.SALT_BYTES)
    root = derived.root(salt, iterations)
    conn.execute(
        "INSERT INTO key_versions (version, salt, iterations, check_value, create_time)"
        " VALUES (%s, %s, %s, %s, %s)",
        (version, salt, iterations, crypto.key_check_value(root, sealed=sealed), time.time()),
    )
    return crypto.KeyVersion(version, root)


def _seal_versions(conn: Connection, versions: Sequence[crypto.KeyVersion], level: int) -> None:
    """Records, in every loaded version's check value, that the rows of the first `level`
    row-MAC upgrades now carry MACs."""
    with conn.cursor() as cursor:
        cursor.executemany(
            "UPDATE key_versions SET check_value = %s WHERE version = %s",
            [(crypto.key_check_value(v.root_key, sealed=level), v.version) for v in versions],
        )


def retire_versions(db: PgDatabase, keep: int) -> list[int]:
    """Marks every key version but `keep` as no longer protecting data."""
    with db.write() as conn:
        versions = [
            int(r["version"])
            for r in conn.execute(
                "SELECT version FROM key_versions WHERE version <> %s AND version NOT IN"
                " (SELECT version FROM key_retirements)",
                (keep,),
            )
        ]
        for version in versions:
            conn.execute(
                "INSERT INTO key_retirements (version, retire_time) VALUES (%s, %s)"
                " ON CONFLICT (version) DO NOTHING",
                (version, time.time()),
            )
    return versions


def check_unlocks(conn: psycopg.Connection[object], master_key: str) -> None:
    """Raises StartupError unless `master_key` unlocks the database behind `conn` (reads only)."""
    cursor = conn.cursor(row_factory=tuple_row)
    try:
        cursor.execute(
            "SELECT version, salt, iterations, check_value FROM key_versions ORDER BY version"
        )
        rows = [(int(r[0]), bytes(r[1]), int(r[2]), bytes(r[3])) for r in cursor.fetchall()]
        cursor.execute("SELECT version FROM key_retirements")
        retired = {int(r[0]) for r in cursor.fetchall()}
    except pg_errors.UndefinedTable:
        raise StartupError(NOT_OURS) from None
    check_key_rows(rows, retired, master_key, "the restored database")


def check_key_rows(rows: list[KeyRow], retired: set[int], master_key: str, name: str) -> None:
    """Raises StartupError unless `master_key` unlocks these key versions."""
    if not rows:
        raise StartupError(NOT_OURS)
    plan_unlock(name, rows, retired, Derivations(master_key), [])
