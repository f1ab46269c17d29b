"""One SQLite file, one writer: the connection, its transactions, and schema migrations.

Why one writing connection behind a lock: the interpreter's bundled SQLite (3.40) can
corrupt a WAL database when two connections write or checkpoint at the same instant
(fixed in 3.51.3). Serialising writes through one connection rules that out. Reads go
through a second, read-only connection, which can do neither: in WAL mode it sees only
committed transactions, so a read never shows what is not yet durable, and it never
waits for a commit's fsync.

Group commit: with `synchronous=FULL` each COMMIT waits for an fsync (hundreds of
microseconds to milliseconds), and one writer doing them one after another caps a
service at one write per fsync. So writers that arrive while the connection is busy
join one transaction, each in its own savepoint, and the last of them commits for all:
one fsync for the group. No writer returns before the COMMIT that holds its work has
returned, so nothing is acknowledged before it is durable; a writer whose block fails
rolls back only its own savepoint.
"""

from __future__ import annotations

import copy
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

# A group commits at this size even if more writers wait, so none waits unboundedly.
MAX_GROUP = 64

_FULL_MESSAGE = (
    "the service's storage is full; nothing was written. An operator must "
    "free space (or raise DB_MAX_BYTES) and the request can be retried"
)


class _Group:
    """Writers whose work shares one transaction, and how its COMMIT ended."""

    __slots__ = ("committed", "error", "members")

    def __init__(self) -> None:
        self.committed = threading.Event()  # set when the COMMIT (or its failure) is known
        self.error: BaseException | None = None
        self.members = 0


class Database:
    """A serialized writing connection with group commit, and a read-only connection."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        lock_fd: int,
        reader: sqlite3.Connection | None = None,
    ) -> None:
        self._conn = conn
        self._lock = threading.Lock()  # the writing connection
        self._lock_fd = lock_fd
        self._queue_lock = threading.Lock()
        self._queued = 0  # threads waiting for self._lock (guarded by _queue_lock)
        self._group: _Group | None = None  # the open transaction, if any
        self._reader = reader if reader is not None else connect(path, read_only=True)
        self._reader.execute("PRAGMA foreign_keys=ON")
        self._read_lock = threading.Lock()
        self.path = path
        self.commits = 0  # COMMITs run (a group counts once); for tests and metrics

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """Holds the writing connection; on leaving, commits the open group unless
        another thread is already waiting to add to it (that one, or a later one,
        will)."""
        with self._queue_lock:
            self._queued += 1
        self._lock.acquire()
        with self._queue_lock:
            self._queued -= 1
        try:
            yield
        finally:
            try:
                group = self._group
                if group is not None:
                    with self._queue_lock:
                        waiting = self._queued
                    if waiting == 0 or group.members >= MAX_GROUP:
                        self._commit(group)
            finally:
                self._lock.release()

    def _commit(self, group: _Group) -> None:
        try:
            self._conn.execute("COMMIT")
            self.commits += 1
        except BaseException as exc:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            group.error = exc
        finally:
            self._group = None
            group.committed.set()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A transaction of its own (a savepoint in the group's): durable when the block
        ends and this returns, rolled back on error.

        A full disk (or the DB_MAX_BYTES limit) rolls the write back and becomes
        RESOURCE_EXHAUSTED; nothing of it is kept.
        """
        with self._turn():
            if self._group is None:
                self._conn.execute("BEGIN IMMEDIATE")
                self._group = _Group()
            group = self._group
            self._conn.execute("SAVEPOINT member")
            try:
                yield self._conn
                # Inside the try: a RELEASE that fails leaves this member's savepoint
                # open, and the group's COMMIT would keep the work of a writer told it
                # failed.
                self._conn.execute("RELEASE member")
            except BaseException as exc:
                self._abandon(group, exc)
                if storage_full(exc):
                    raise ResourceExhausted(_FULL_MESSAGE) from None
                raise
            group.members += 1
        group.committed.wait()
        if group.error is not None:
            if storage_full(group.error):
                raise ResourceExhausted(_FULL_MESSAGE) from None
            # A copy: the same exception object raised in several threads at once would
            # share (and garble) one traceback.
            raise copy.copy(group.error)

    def _abandon(self, group: _Group, exc: BaseException) -> None:
        """Undoes a failed member's work. Some errors (a full disk, I/O) make SQLite roll
        the whole transaction back; then the group's other members fail too, rather than
        be told their vanished work is durable."""
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK TO member")
            self._conn.execute("RELEASE member")
            return
        group.error = exc
        self._group = None
        group.committed.set()

    @contextmanager
    def read(self, *, snapshot: bool = True) -> Iterator[sqlite3.Connection]:
        """A read transaction on the read-only connection: every query in the block sees
        one snapshot of what is committed.

        `snapshot=False` skips BEGIN/COMMIT for a block of one statement, which SQLite
        runs atomically on its own (a third of a point read's cost).
        """
        with self._read_lock:
            if not snapshot:
                yield self._reader
                return
            self._reader.execute("BEGIN")
            try:
                yield self._reader
            finally:
                self._reader.execute("COMMIT")

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
        rotation task logs it and tries again on its next pass). A group of writes open at
        that moment is committed first.
        """
        for _ in range(attempts):
            # Our own reader is held idle too: TRUNCATE waits for every reader of the WAL.
            with self._read_lock, self._turn():
                if self._group is not None:
                    self._commit(self._group)
                busy, _, _ = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if not busy:
                return
            time.sleep(0.1)
        raise RuntimeError("the WAL could not be checkpointed: a reader kept it busy")

    def page_bytes(self) -> int:
        with self._read_lock:
            pages = self._reader.execute("PRAGMA page_count").fetchone()[0]
            size = self._reader.execute("PRAGMA page_size").fetchone()[0]
        return int(pages) * int(size)

    def close(self) -> None:
        with self._read_lock:
            self._reader.close()
        with self._turn():
            if self._group is not None:
                self._commit(self._group)
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
