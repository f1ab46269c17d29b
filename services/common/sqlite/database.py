"""One SQLite file, one writer: the connection, its transactions, and schema migrations.

Why one connection behind a lock: the interpreter's bundled SQLite (3.40) can corrupt a
WAL database when two connections write or checkpoint at the same instant (fixed in
3.51.3). Serialising through one connection rules that out, and SQLite point queries take
microseconds, so the lock is not the bottleneck of an RPC.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from services.common.errors import ResourceExhausted, StartupError
from services.common.schema import Migration

Synchronous = Literal["FULL", "NORMAL"]


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
                if storage_full(exc):
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
        reader = connect(self.path, read_only=True)
        try:
            reader.execute("VACUUM INTO ?", (str(target),))
        finally:
            reader.close()

    def checkpoint(self, attempts: int = 50) -> None:
        """Copies the WAL into the main file and truncates it to nothing.

        Key rotation calls this before retiring a key: until then the WAL may still hold
        page images with ciphertexts under the old key. A reader (a backup in progress)
        can hold the WAL back, so this retries for a while, then raises RuntimeError (the
        rotation task logs it and tries again on its next pass).
        """
        for _ in range(attempts):
            with self._lock:
                busy, _, _ = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if not busy:
                return
            time.sleep(0.1)
        raise RuntimeError("the WAL could not be checkpointed: a reader kept it busy")

    def page_bytes(self) -> int:
        with self._lock:
            pages = self._conn.execute("PRAGMA page_count").fetchone()[0]
            size = self._conn.execute("PRAGMA page_size").fetchone()[0]
        return int(pages) * int(size)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            os.close(self._lock_fd)


def storage_full(exc: BaseException) -> bool:
    """Whether SQLite refused a write for want of space: a full disk or max_page_count.

    Judged by SQLite's result code (the low byte holds the primary code), never by the
    message text, which other errors can share ("no such table: fullness").
    """
    code = getattr(exc, "sqlite_errorcode", None)
    return (
        isinstance(exc, sqlite3.Error) and code is not None and code & 0xFF == sqlite3.SQLITE_FULL
    )


def lock_exclusively(path: Path) -> int:
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


def connect(
    path: Path, *, read_only: bool = False, immutable: bool = False, shm_read_only: bool = False
) -> sqlite3.Connection:
    """`shm_read_only` reads a WAL without writing its -shm index (SQLite then rebuilds the
    index in private memory): for looking at a file that is not ours yet."""
    if read_only:
        flags = "mode=ro&immutable=1" if immutable else "mode=ro"
        if shm_read_only and not immutable:
            flags += "&readonly_shm=1"
        conn = sqlite3.connect(
            f"file:{path}?{flags}", uri=True, isolation_level=None, check_same_thread=False
        )
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def table_exists(conn: sqlite3.Connection, name: str) -> bool:
    query = "SELECT 1 FROM sqlite_master WHERE type='table' AND name=?"
    return conn.execute(query, (name,)).fetchone() is not None


def migrate(conn: sqlite3.Connection, migrations: Sequence[Migration], current: int) -> None:
    """Runs the steps after `current` inside the caller's open transaction."""
    for migration in migrations:
        if migration.version > current:
            for statement in _split(migration.sql):
                conn.execute(statement)


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


def any_of(values: Sequence[object]) -> str:
    """`(?, ?, ...)` for an IN clause over `values` (blind-index candidates, say)."""
    return "(" + ", ".join("?" * len(values)) + ")"
