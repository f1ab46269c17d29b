"""Opening a service's SQLite database: from the environment to an unlocked keyring.

Opening follows "touch nothing unless the key is right": an existing file is first read
read-only and its key-check value compared; only then is it opened for writing, and
migrations and a new key version happen in one transaction.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.common import crypto
from services.common.config import DatabaseConfig, Env
from services.common.keyversions import Derivations
from services.common.schema import Migration, check_numbering
from services.common.sqlite.database import (
    Database,
    Synchronous,
    connect,
    lock_exclusively,
    migrate,
)
from services.common.sqlite.keys import migrate_base, precheck_existing, unlock


@dataclass(frozen=True)
class OpenedDatabase:
    database: Database
    keyring: crypto.Keyring


def open_database(
    path: Path,
    *,
    service: str,
    master_key: str,
    kdf_iterations: int,
    migrations: Sequence[Migration],
    synchronous: Synchronous,
    old_keys: Sequence[str] = (),
    max_bytes: int = 0,
) -> OpenedDatabase:
    """Opens (or creates) a service's database and unlocks its keyring.

    `master_key` is the primary key: new data is encrypted under it. When it is new to
    the database, one of `old_keys` must unlock it; a new key version is then recorded
    and the old versions stay loaded until re-encryption retires them (key rotation).

    Raises StartupError, having written nothing, when the file is not a database, was
    made by a newer version, or the keys given do not unlock every key version in use.
    """
    check_numbering(migrations)
    path.parent.mkdir(parents=True, exist_ok=True)
    derived = Derivations(master_key)
    olds = [Derivations(key) for key in old_keys if key != master_key]
    if path.exists() and path.stat().st_size > 0:
        precheck_existing(path, derived, olds, latest=migrations[-1].version)

    lock_fd = lock_exclusively(path)
    try:
        conn = connect(path)
    except BaseException:
        os.close(lock_fd)
        raise
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        if max_bytes:
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count={max(1, max_bytes // page_size)}")
        conn.execute("BEGIN IMMEDIATE")
        try:
            migrate_base(conn)
            migrate(conn, migrations, conn.execute("PRAGMA user_version").fetchone()[0])
            conn.execute(f"PRAGMA user_version={migrations[-1].version}")
            versions, primary = unlock(conn, derived, olds, kdf_iterations)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    except BaseException:
        conn.close()
        os.close(lock_fd)
        raise
    keyring = crypto.Keyring(service, versions, primary=primary)
    return OpenedDatabase(Database(conn, path, lock_fd), keyring)


def open_service_database(
    service: str, env: Env, migrations: Sequence[Migration], synchronous: Synchronous
) -> OpenedDatabase:
    """open_database with DB_PATH, DB_ENCRYPTION_KEY(_FILE), DB_ENCRYPTION_OLD_KEYS(_FILE)."""
    config = DatabaseConfig.from_env(service, env)
    return open_database(
        config.path,
        service=service,
        master_key=config.master_key,
        kdf_iterations=config.kdf_iterations,
        migrations=migrations,
        synchronous=synchronous,
        old_keys=config.old_keys,
        max_bytes=config.max_bytes,
    )
