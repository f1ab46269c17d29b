"""Opening a service's SQLite database: from the environment to an unlocked keyring.

Opening follows "touch nothing unless the key is right": an existing file is first read
read-only and its key-check value compared; only then is it opened for writing, and
migrations and a new key version happen in one transaction.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.common import crypto
from services.common.config import DatabaseConfig, Env
from services.common.errors import StartupError
from services.common.keyversions import Derivations
from services.common.schema import Migration, check_numbering
from services.common.sqlite.database import (
    Database,
    Synchronous,
    connect,
    lock_exclusively,
    migrate,
)
from services.common.sqlite.keys import (
    Unlocked,
    migrate_base,
    precheck_existing,
    seal_versions,
    unlock,
)

logger = logging.getLogger(__name__)

JOURNAL_SIZE_LIMIT = 16 * 1024 * 1024


@dataclass(frozen=True)
class OpenedDatabase:
    database: Database
    keyring: crypto.Keyring


@dataclass(frozen=True)
class RowSealing:
    """How a service's rows come to carry MACs (see crypto.Mac, crypto.key_check_value).

    `since` is the service migration that added the MAC columns. `seal_legacy` MACs, in
    the open transaction, every row written before it (and moves any other data the same
    upgrade moves); it runs once: afterwards the key-check values record that rows are
    sealed, and a row without a MAC is an integrity failure, never one to seal again.
    """

    since: int
    seal_legacy: Callable[[sqlite3.Connection, crypto.Keyring], int]
    # Later upgrades that gave more tables MACs, in order: each seals its own older rows
    # once, and the key-check values record how many are done (levels 2, 3, ...).
    later: Sequence[RowSealing] = ()

    @property
    def steps(self) -> list[RowSealing]:
        return [self, *self.later]


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
    sealing: RowSealing | None = None,
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
        # Freed space is zeroed, so an updated or deleted row's old bytes (a ciphertext
        # under a retired key, say) do not linger in the file; and the WAL is cut back to
        # this size whenever it is reset, so it does not keep old frames in bulk either.
        conn.execute("PRAGMA secure_delete=ON")
        conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
        conn.execute("PRAGMA foreign_keys=ON")
        if max_bytes:
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count={max(1, max_bytes // page_size)}")
        conn.execute("BEGIN IMMEDIATE")
        try:
            migrate_base(conn)
            before = int(conn.execute("PRAGMA user_version").fetchone()[0])
            unlocked = unlock(conn, derived, olds, kdf_iterations)
            if sealing is not None:
                _refuse_rewound(path, unlocked, before, sealing)
            migrate(conn, migrations, before)
            conn.execute(f"PRAGMA user_version={migrations[-1].version}")
            keyring = crypto.Keyring(service, unlocked.versions, primary=unlocked.primary)
            if sealing is not None and unlocked.sealed < len(sealing.steps):
                _seal(conn, keyring, unlocked, sealing)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    except BaseException:
        conn.close()
        os.close(lock_fd)
        raise
    return OpenedDatabase(Database(conn, path, lock_fd), keyring)


def _refuse_rewound(path: Path, unlocked: Unlocked, before: int, sealing: RowSealing) -> None:
    if any(before < step.since for step in sealing.steps[: unlocked.sealed]):
        raise StartupError(
            f"{path.name} records that its rows carry MACs, but its schema (version "
            f"{before}) is from before them: someone who can write the file rewound it. "
            "Restore it from a backup; the file was not modified"
        )


def _seal(
    conn: sqlite3.Connection, keyring: crypto.Keyring, unlocked: Unlocked, sealing: RowSealing
) -> None:
    count = sum(step.seal_legacy(conn, keyring) for step in sealing.steps[unlocked.sealed :])
    seal_versions(conn, unlocked.versions, len(sealing.steps))
    if count:
        logger.warning(
            "rows from before row MACs sealed as they are (once, at the upgrade)",
            extra={"fields": {"rows": count}},
        )


def open_service_database(
    service: str,
    env: Env,
    migrations: Sequence[Migration],
    synchronous: Synchronous,
    sealing: RowSealing | None = None,
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
        sealing=sealing,
    )
