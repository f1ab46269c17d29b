"""Key versions in a SQLite file: the tables that hold them, checking a file before it is
opened for writing, unlocking, recording a new primary key, retiring old ones.

Which keys unlock which versions is decided in services.common.keyversions, the same on
every backend; this module reads and writes the rows.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.common import crypto
from services.common.errors import StartupError
from services.common.keyversions import Derivations, KeyRow, plan_unlock, sealed_level
from services.common.schema import Migration
from services.common.sqlite.database import Database, connect, migrate, table_exists

# The tables every service database has, whatever the service, with their own numbered
# steps recorded in securemsg_schema (a service's own steps are in PRAGMA user_version).
# Files from before securemsg_schema existed already hold key_versions and may hold
# key_retirements, hence IF NOT EXISTS.
BASE_MIGRATIONS = [
    Migration(
        1,
        """
        CREATE TABLE IF NOT EXISTS securemsg_schema (
            id      INTEGER PRIMARY KEY CHECK (id = 1),
            version INTEGER NOT NULL
        ) STRICT;
        CREATE TABLE IF NOT EXISTS key_versions (
            version     INTEGER PRIMARY KEY,
            salt        BLOB    NOT NULL,
            iterations  INTEGER NOT NULL,
            check_value BLOB    NOT NULL,
            create_time REAL    NOT NULL
        ) STRICT;
        """,
    ),
    Migration(
        2,
        """
        CREATE TABLE IF NOT EXISTS key_retirements (
            version     INTEGER PRIMARY KEY,
            retire_time REAL    NOT NULL
        ) STRICT;
        """,
    ),
]


def _base_version(conn: sqlite3.Connection) -> int:
    if not table_exists(conn, "securemsg_schema"):
        return 0
    row = conn.execute("SELECT version FROM securemsg_schema WHERE id = 1").fetchone()
    return 0 if row is None else int(row[0])


def migrate_base(conn: sqlite3.Connection) -> None:
    """Brings the key tables up to date, inside the caller's open write transaction."""
    current = _base_version(conn)
    latest = BASE_MIGRATIONS[-1].version
    if current < latest:
        migrate(conn, BASE_MIGRATIONS, current)
        conn.execute(
            "INSERT INTO securemsg_schema (id, version) VALUES (1, ?)"
            " ON CONFLICT (id) DO UPDATE SET version = excluded.version",
            (latest,),
        )


def _key_rows(conn: sqlite3.Connection) -> list[KeyRow]:
    if not table_exists(conn, "key_versions"):
        return []
    rows = conn.execute(
        "SELECT version, salt, iterations, check_value FROM key_versions ORDER BY version"
    )
    return [(int(r[0]), bytes(r[1]), int(r[2]), bytes(r[3])) for r in rows]


def _retired(conn: sqlite3.Connection) -> set[int]:
    if not table_exists(conn, "key_retirements"):  # a file from before retirements
        return set()
    return {row[0] for row in conn.execute("SELECT version FROM key_retirements")}


def precheck_existing(
    path: Path, derived: Derivations, olds: Sequence[Derivations], *, latest: int
) -> None:
    """Refuses, having written nothing, a file that is damaged, from a newer release, or
    that the keys do not unlock. `latest` is the service's newest schema version."""
    # A clean shutdown leaves no -wal file: read the main file immutably, creating nothing.
    # After a crash the WAL holds committed data, so read through it, leaving the -shm
    # index as it is (a refused start must not even rebuild that).
    wal = Path(f"{path}-wal")
    immutable = not (wal.exists() and wal.stat().st_size > 0)
    try:
        conn = connect(path, read_only=True, immutable=immutable, shm_read_only=True)
        try:
            schema_version = conn.execute("PRAGMA user_version").fetchone()[0]
            health = conn.execute("PRAGMA quick_check").fetchone()[0]
            base_version = _base_version(conn)
            rows = _key_rows(conn)
            retired = _retired(conn)
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise StartupError(
            f"{path.name} is not a readable SQLite database ({exc}); restore it from a backup "
            "or point DB_PATH at the right file"
        ) from None
    if health != "ok":
        raise StartupError(
            f"{path.name} is damaged (SQLite quick_check: {health}); restore it from a "
            "backup. The file was not modified"
        )
    if schema_version > latest or base_version > BASE_MIGRATIONS[-1].version:
        raise StartupError(
            f"{path.name} has schema version {schema_version} (base {base_version}), newer "
            f"than this release understands ({latest}, base {BASE_MIGRATIONS[-1].version}); "
            "run the newer release"
        )
    if rows:
        plan_unlock(path.name, rows, retired, derived, olds)


def check_unlocks(path: Path, master_key: str) -> None:
    """Raises StartupError unless `path` is a database that `master_key` unlocks.

    Reads only (immutably): safe on a backup file that must stay untouched.
    """
    if not path.exists() or path.stat().st_size == 0:
        raise StartupError(f"{path.name} does not exist or is empty")
    conn = connect(path, read_only=True, immutable=True)
    try:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise StartupError(f"{path.name} is not a readable SQLite database ({exc})") from None
    finally:
        conn.close()
    if integrity != "ok":
        raise StartupError(f"{path.name} fails its integrity check: {integrity}")
    precheck_existing(path, Derivations(master_key), [], latest=2**31)
    with contextlib.closing(connect(path, read_only=True, immutable=True)) as conn:
        if not _key_rows(conn):
            raise StartupError(f"{path.name} has no key metadata; it is not a SecureMsg database")


@dataclass(frozen=True)
class Unlocked:
    versions: list[crypto.KeyVersion]
    primary: int
    # How many row-MAC upgrades the check values say are sealed (crypto.key_check_value).
    sealed: int


def unlock(
    conn: sqlite3.Connection,
    primary: Derivations,
    olds: Sequence[Derivations],
    iterations: int,
) -> Unlocked:
    """Every version unlocked and the primary one, inside the caller's open write
    transaction; a primary key new to the database is recorded as the next version."""
    rows = _key_rows(conn)
    if not rows:
        return Unlocked([_add_version(conn, primary, iterations, 1, sealed=0)], 1, 0)
    known, loaded = plan_unlock("the database", rows, _retired(conn), primary, olds)
    sealed = sealed_level(rows, loaded)
    if known is None:  # a new primary key: record it as the next version
        known = _add_version(conn, primary, iterations, rows[-1][0] + 1, sealed=sealed)
        loaded[known.version] = known
    return Unlocked(list(loaded.values()), known.version, sealed)


def seal_versions(
    conn: sqlite3.Connection, versions: Sequence[crypto.KeyVersion], level: int
) -> None:
    """Records, in every loaded version's check value, that the rows of the first `level`
    row-MAC upgrades now carry MACs."""
    conn.executemany(
        "UPDATE key_versions SET check_value = ? WHERE version = ?",
        [(crypto.key_check_value(v.root_key, sealed=level), v.version) for v in versions],
    )


def _add_version(
    conn: sqlite3.Connection, derived: Derivations, iterations: int, version: int, *, sealed: int
) -> crypto.KeyVersion:
    salt = os.urandom(crypto.SALT_BYTES)
    root = derived.root(salt, iterations)
    conn.execute(
        "INSERT INTO key_versions (version, salt, iterations, check_value, create_time)"
        " VALUES (?, ?, ?, ?, ?)",
        (version, salt, iterations, crypto.key_check_value(root, sealed=sealed), time.time()),
    )
    return crypto.KeyVersion(version, root)


def retire_versions(db: Database, keep: int) -> list[int]:
    """Marks every key version but `keep` as no longer protecting data."""
    with db.write() as conn:
        versions = [
            row[0]
            for row in conn.execute(
                "SELECT version FROM key_versions WHERE version != ? AND version NOT IN"
                " (SELECT version FROM key_retirements)",
                (keep,),
            )
        ]
        conn.executemany(
            "INSERT INTO key_retirements (version, retire_time) VALUES (?, ?)",
            [(v, time.time()) for v in versions],
        )
    return versions
