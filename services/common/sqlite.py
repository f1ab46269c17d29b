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
from services.common.config import DatabaseConfig, Env
from services.common.errors import ResourceExhausted, StartupError

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
        """An IMMEDIATE transaction: committed when the block ends, rolled back on error.

        A full disk (or the DB_MAX_BYTES limit) rolls the whole transaction back and
        becomes RESOURCE_EXHAUSTED; nothing of it is kept.
        """
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException as exc:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
                    raise ResourceExhausted(
                        "the service's storage is full; nothing was written. An operator must "
                        "free space (or raise DB_MAX_BYTES) and the request can be retried"
                    ) from None
                raise

    @contextmanager
    def read(self, *, snapshot: bool = True) -> Iterator[sqlite3.Connection]:
        """A read transaction: every query in the block sees one snapshot.

        `snapshot=False` skips BEGIN/COMMIT for a block of one statement, which SQLite
        runs atomically on its own (a third of a point read's cost).
        """
        with self._lock:
            if not snapshot:
                yield self._conn
                return
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
    _check_migrations(migrations)
    path.parent.mkdir(parents=True, exist_ok=True)
    derived = _Derivations(master_key)
    olds = [_Derivations(key) for key in old_keys if key != master_key]
    if path.exists() and path.stat().st_size > 0:
        _precheck_existing(path, derived, olds, latest=migrations[-1].version)

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
        if max_bytes:
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count={max(1, max_bytes // page_size)}")
        conn.execute("BEGIN IMMEDIATE")
        try:
            _migrate(conn, migrations)
            versions, primary = _unlock(conn, derived, olds, kdf_iterations)
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


def _precheck_existing(
    path: Path, derived: _Derivations, olds: list[_Derivations], *, latest: int
) -> None:
    # A clean shutdown leaves no -wal file: read the main file immutably, creating nothing.
    # After a crash the WAL holds committed data, so read through it (the -shm exists).
    wal = Path(f"{path}-wal")
    immutable = not (wal.exists() and wal.stat().st_size > 0)
    try:
        conn = _connect(path, read_only=True, immutable=immutable)
        try:
            schema_version = conn.execute("PRAGMA user_version").fetchone()[0]
            health = conn.execute("PRAGMA quick_check").fetchone()[0]
            has_keys = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='key_versions'"
            ).fetchone()
            rows = _key_rows(conn) if has_keys else []
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
    if schema_version > latest:
        raise StartupError(
            f"{path.name} has schema version {schema_version}, newer than this release "
            f"understands ({latest}); run the newer release"
        )
    if rows:
        _plan(path.name, rows, retired, derived, olds)


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
    _precheck_existing(path, _Derivations(master_key), [], latest=2**31)
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


_RETIREMENTS = """
CREATE TABLE IF NOT EXISTS key_retirements (
    version     INTEGER PRIMARY KEY,
    retire_time REAL    NOT NULL
) STRICT
"""


def _key_rows(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    return conn.execute(
        "SELECT version, salt, iterations, check_value FROM key_versions ORDER BY version"
    ).fetchall()


def _retired(conn: sqlite3.Connection) -> set[int]:
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='key_retirements'"
    ).fetchone()
    if not exists:
        return set()
    return {row[0] for row in conn.execute("SELECT version FROM key_retirements")}


def _plan(
    name: str,
    rows: Sequence[sqlite3.Row],
    retired: set[int],
    primary: _Derivations,
    olds: list[_Derivations],
) -> tuple[crypto.KeyVersion | None, dict[int, crypto.KeyVersion]]:
    """(primary's version if known, old versions unlocked); raises if keys are missing."""

    def unlock(derived: _Derivations) -> crypto.KeyVersion | None:
        for version, salt, iterations, check in rows:
            if _matches(derived, salt, iterations, check):
                return crypto.KeyVersion(version, derived.root(salt, iterations))
        return None

    primary_version = unlock(primary)
    if primary_version is not None and primary_version.version in retired:
        raise StartupError(
            f"DB_ENCRYPTION_KEY unlocks only retired key version {primary_version.version} of "
            f"{name}: its data was re-encrypted under a newer key. Use that key"
        )
    loaded = {v.version: v for v in map(unlock, olds) if v is not None and v.version not in retired}
    if primary_version is None and not loaded:
        raise StartupError(
            f"DB_ENCRYPTION_KEY does not unlock {name}: it was encrypted under another "
            "key. Refusing to start; the file was not modified. (Rotating keys? Put the "
            "previous key in DB_ENCRYPTION_OLD_KEYS.)"
        )
    if primary_version is not None:
        loaded[primary_version.version] = primary_version
    missing = sorted({row[0] for row in rows} - retired - set(loaded))
    if missing:
        raise StartupError(
            f"key version(s) {', '.join(map(str, missing))} of {name} still protect data: "
            "give their keys in DB_ENCRYPTION_OLD_KEYS until re-encryption retires them"
        )
    return primary_version, loaded


def _unlock(
    conn: sqlite3.Connection, primary: _Derivations, olds: list[_Derivations], iterations: int
) -> tuple[list[crypto.KeyVersion], int]:
    conn.execute(_RETIREMENTS)
    rows = _key_rows(conn)
    if not rows:
        return [_add_version(conn, primary, iterations, 1)], 1
    known, loaded = _plan("the database", rows, _retired(conn), primary, olds)
    if known is None:  # a new primary key: record it as the next version
        known = _add_version(conn, primary, iterations, rows[-1][0] + 1)
        loaded[known.version] = known
    return list(loaded.values()), known.version


def _add_version(
    conn: sqlite3.Connection, derived: _Derivations, iterations: int, version: int
) -> crypto.KeyVersion:
    salt = os.urandom(crypto.SALT_BYTES)
    root = derived.root(salt, iterations)
    conn.execute(
        "INSERT INTO key_versions (version, salt, iterations, check_value, create_time)"
        " VALUES (?, ?, ?, ?, ?)",
        (version, salt, iterations, crypto.key_check_value(root), time.time()),
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


def any_of(values: Sequence[object]) -> str:
    """`(?, ?, ...)` for an IN clause over `values` (blind-index candidates, say)."""
    return "(" + ", ".join("?" * len(values)) + ")"


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
