"""SQLite base for the persistent services: one file, one writer, versioned schema.

Why one connection behind a lock: the interpreter's bundled SQLite (3.40) can corrupt a
WAL database when two connections write or checkpoint at the same instant (fixed in
3.51.3). Serialising through one connection rules that out, and SQLite point queries take
microseconds, so the lock is not the bottleneck of an RPC.

Opening follows "touch nothing unless the key is right": an existing file is first read
read-only and its key-check value compared; only then is it opened for writing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from services.common import crypto
from services.common.errors import StartupError

Synchronous = Literal["FULL", "NORMAL"]

_KEY_TABLE = """
CREATE TABLE key_versions (
    version     INTEGER PRIMARY KEY,
    salt        BLOB    NOT NULL,
    iterations  INTEGER NOT NULL,
    check_value BLOB    NOT NULL,
    create_time REAL    NOT NULL
) STRICT;
"""


@dataclass(frozen=True)
class Migration:
    """One step of a service's schema; `version` counts up from 1 without gaps."""

    version: int
    sql: str


class Database:
    """A single serialized connection with explicit transactions."""

    def __init__(self, conn: sqlite3.Connection, path: Path, lock_fd: int) -> None:
        self._conn = conn
        self._lock = threading.RLock()
        self._lock_fd = lock_fd
        self.path = path

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """An IMMEDIATE transaction: committed when the block ends, rolled back on error."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every query in the block sees one snapshot."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._conn.execute("COMMIT")

    def snapshot(self, target: Path) -> None:
        """Writes a consistent copy of the database to `target` without blocking writers.

        A separate read-only connection runs VACUUM INTO inside its own read transaction;
        a read-only connection never checkpoints, so the single-writer rule holds.
        """
        reader = _connect(self.path, read_only=True)
        try:
            reader.execute("VACUUM INTO ?", (str(target),))
        finally:
            reader.close()

    def page_bytes(self) -> int:
        with self._lock:
            pages = self._conn.execute("PRAGMA page_count").fetchone()[0]
            size = self._conn.execute("PRAGMA page_size").fetchone()[0]
        return int(pages) * int(size)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            os.close(self._lock_fd)


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
) -> OpenedDatabase:
    """Opens (or creates) a service's database and unlocks its keyring.

    Raises StartupError, having written nothing, when the file is not a database, was
    made by a newer version, or was encrypted under another master key.
    """
    _check_migrations(migrations)
    path.parent.mkdir(parents=True, exist_ok=True)
    derived = _Derivations(master_key)
    if path.exists() and path.stat().st_size > 0:
        _precheck_existing(path, derived, latest=migrations[-1].version)

    lock_fd = _lock_exclusively(path)
    try:
        conn = _connect(path)
    except BaseException:
        os.close(lock_fd)
        raise
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("BEGIN IMMEDIATE")
        try:
            _migrate(conn, migrations)
            version = _unlock_or_create_key(conn, derived, kdf_iterations)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    except BaseException:
        conn.close()
        os.close(lock_fd)
        raise
    keyring = crypto.Keyring(service, [version], primary=version.version)
    return OpenedDatabase(Database(conn, path, lock_fd), keyring)


def _lock_exclusively(path: Path) -> int:
    """One process per database file: a second writer could corrupt it (see above)."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(
            f"{path.name} is in use by another process; run one instance per database file"
        ) from None
    return fd


def _connect(path: Path, *, read_only: bool = False, immutable: bool = False) -> sqlite3.Connection:
    if read_only:
        flags = "mode=ro&immutable=1" if immutable else "mode=ro"
        conn = sqlite3.connect(
            f"file:{path}?{flags}", uri=True, isolation_level=None, check_same_thread=False
        )
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


class _Derivations:
    """Caches PBKDF2 results so the pre-check and the real open derive only once."""

    def __init__(self, master_key: str) -> None:
        self._master = master_key
        self._cache: dict[tuple[bytes, int], bytes] = {}

    def root(self, salt: bytes, iterations: int) -> bytes:
        key = (salt, iterations)
        if key not in self._cache:
            self._cache[key] = crypto.derive_root_key(self._master, salt, iterations)
        return self._cache[key]


def _check_migrations(migrations: Sequence[Migration]) -> None:
    versions = [m.version for m in migrations]
    if not versions or versions != list(range(1, len(versions) + 1)):
        raise ValueError("migrations must be numbered 1, 2, 3, ... without gaps")


def _precheck_existing(path: Path, derived: _Derivations, *, latest: int) -> None:
    # A clean shutdown leaves no -wal file: read the main file immutably, creating nothing.
    # After a crash the WAL holds committed data, so read through it (the -shm exists).
    wal = Path(f"{path}-wal")
    immutable = not (wal.exists() and wal.stat().st_size > 0)
    try:
        conn = _connect(path, read_only=True, immutable=immutable)
        try:
            schema_version = conn.execute("PRAGMA user_version").fetchone()[0]
            has_keys = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='key_versions'"
            ).fetchone()
            rows = (
                conn.execute("SELECT salt, iterations, check_value FROM key_versions").fetchall()
                if has_keys
                else []
            )
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise StartupError(
            f"{path.name} is not a readable SQLite database ({exc}); restore it from a backup "
            "or point DB_PATH at the right file"
        ) from None
    if schema_version > latest:
        raise StartupError(
            f"{path.name} has schema version {schema_version}, newer than this release "
            f"understands ({latest}); run the newer release"
        )
    if rows and not any(_matches(derived, salt, it, check) for salt, it, check in rows):
        raise StartupError(
            f"DB_ENCRYPTION_KEY does not unlock {path.name}: it was encrypted under another "
            "key. Refusing to start; the file was not modified"
        )


def check_unlocks(path: Path, master_key: str) -> None:
    """Raises StartupError unless `path` is a database that `master_key` unlocks.

    Reads only (immutably): safe on a backup file that must stay untouched.
    """
    if not path.exists() or path.stat().st_size == 0:
        raise StartupError(f"{path.name} does not exist or is empty")
    conn = _connect(path, read_only=True, immutable=True)
    try:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise StartupError(f"{path.name} is not a readable SQLite database ({exc})") from None
    finally:
        conn.close()
    if integrity != "ok":
        raise StartupError(f"{path.name} fails its integrity check: {integrity}")
    _precheck_existing(path, _Derivations(master_key), latest=2**31)
    with contextlib.closing(_connect(path, read_only=True, immutable=True)) as conn:
        has_keys = conn.execute("SELECT COUNT(*) FROM key_versions").fetchone()[0]
    if not has_keys:
        raise StartupError(f"{path.name} has no key metadata; it is not a SecureMsg database")


def _matches(derived: _Derivations, salt: bytes, iterations: int, check: bytes) -> bool:
    return hmac.compare_digest(crypto.key_check_value(derived.root(salt, iterations)), check)


def _migrate(conn: sqlite3.Connection, migrations: Sequence[Migration]) -> None:
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    if current == 0:
        conn.execute(_KEY_TABLE)
    for migration in migrations:
        if migration.version > current:
            for statement in _split(migration.sql):
                conn.execute(statement)
    conn.execute(f"PRAGMA user_version={migrations[-1].version}")


def _split(script: str) -> list[str]:
    # executescript() would COMMIT our transaction; run statement by statement instead.
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        raise ValueError(f"incomplete SQL statement in migration: {buffer.strip()[:60]}")
    return statements


def _unlock_or_create_key(
    conn: sqlite3.Connection, derived: _Derivations, iterations: int
) -> crypto.KeyVersion:
    rows = conn.execute(
        "SELECT version, salt, iterations, check_value FROM key_versions ORDER BY version DESC"
    ).fetchall()
    for version, salt, its, check in rows:
        if _matches(derived, salt, its, check):
            return crypto.KeyVersion(version, derived.root(salt, its))
    if rows:
        raise StartupError("DB_ENCRYPTION_KEY does not unlock the database; refusing to start")
    salt = os.urandom(crypto.SALT_BYTES)
    root = derived.root(salt, iterations)
    conn.execute(
        "INSERT INTO key_versions (version, salt, iterations, check_value, create_time)"
        " VALUES (1, ?, ?, ?, ?)",
        (salt, iterations, crypto.key_check_value(root), time.time()),
    )
    return crypto.KeyVersion(1, root)
