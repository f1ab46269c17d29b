"""Group commit: concurrent writers share one COMMIT, and none returns before it.

The writers are real threads on a real SQLite file with synchronous=FULL. Which writers
share a group is made certain, not left to timing: the first writer holds its block
open until the others are queued for the connection.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from services.common.errors import ResourceExhausted
from services.common.sqlite import Database, Migration, open_database

MIGRATIONS = [
    Migration(
        1,
        """
        CREATE TABLE notes (id INTEGER PRIMARY KEY, body BLOB NOT NULL) STRICT;
        CREATE TABLE parents (id INTEGER PRIMARY KEY) STRICT;
        CREATE TABLE children (
            id     INTEGER PRIMARY KEY,
            parent INTEGER REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED
        ) STRICT;
        """,
    ),
]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    opened = open_database(
        tmp_path / "notes.db",
        service="test",
        master_key="a sufficiently long key",
        kdf_iterations=100_000,
        migrations=MIGRATIONS,
        synchronous="FULL",
    )
    yield opened.database
    opened.database.close()


def committed(db: Database, note_id: int) -> bool:
    """Whether a row is committed, asked through a connection of its own."""
    conn = sqlite3.connect(f"file:{db.path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT 1 FROM notes WHERE id = ?", (note_id,)).fetchone() is not None
    finally:
        conn.close()


def insert(note_id: int, body: bytes = b"x") -> Callable[[sqlite3.Connection], None]:
    def work(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO notes (id, body) VALUES (?, ?)", (note_id, body))

    return work


def queued(db: Database, count: int) -> None:
    """Waits until `count` threads wait for the writing connection (no time limit:
    the test's own timeout ends a hang)."""
    while db._queued < count:
        time.sleep(0.001)


class Writer(threading.Thread):
    """Runs one write block; records what it was told and when it returned."""

    def __init__(self, db: Database, work: Callable[[sqlite3.Connection], None]) -> None:
        super().__init__()
        self.db = db
        self.work = work
        self.error: BaseException | None = None
        self.returned = threading.Event()

    def run(self) -> None:
        try:
            with self.db.write() as conn:
                self.work(conn)
        except BaseException as exc:
            self.error = exc
        self.returned.set()


def group_of(db: Database, first: Callable[[sqlite3.Connection], None], *others: Writer) -> Writer:
    """Starts a writer running `first`, which holds its block until `others` are all
    queued behind it, so that they join its group."""
    entered, release = threading.Event(), threading.Event()

    def held(conn: sqlite3.Connection) -> None:
        first(conn)
        entered.set()
        release.wait()

    leader = Writer(db, held)
    leader.start()
    entered.wait()
    for writer in others:
        writer.start()
    queued(db, len(others))
    release.set()
    return leader


def test_concurrent_writers_share_one_commit_and_each_is_committed_when_it_returns(
    db: Database,
) -> None:
    seen: dict[int, bool] = {}

    def checked(note_id: int) -> Writer:
        writer = Writer(db, insert(note_id))
        original = writer.run

        def run() -> None:
            original()
            seen[note_id] = committed(db, note_id)  # right after write() returned

        writer.run = run  # type: ignore[method-assign]
        return writer

    before = db.commits
    followers = [checked(n) for n in range(2, 9)]
    leader = group_of(db, insert(1), *followers)
    for writer in [leader, *followers]:
        writer.join()
        assert writer.error is None

    assert db.commits == before + 1  # eight writes, one COMMIT (one fsync)
    assert seen == {n: True for n in range(2, 9)}
    assert all(committed(db, n) for n in range(1, 9))


def test_no_writer_returns_while_its_group_is_still_open(db: Database) -> None:
    leader_returned = threading.Event()
    observed: list[bool] = []

    def last_member(conn: sqlite3.Connection) -> None:
        insert(2)(conn)
        # The leader's work is in this same open transaction: it must not have been
        # told "done". Waiting bounds how long a wrong implementation has to show it;
        # a right one never sets the event, however slow the machine.
        observed.append(leader_returned.wait(1.0))
        observed.append(committed(db, 1))

    follower = Writer(db, last_member)
    leader = group_of(db, insert(1), follower)
    leader.returned.wait()
    leader_returned.set()
    follower.join()
    leader.join()

    assert observed == [False, False]
    assert leader.error is None
    assert follower.error is None
    assert committed(db, 1)
    assert committed(db, 2)


def test_a_failing_member_rolls_back_only_its_own_work(db: Database) -> None:
    def failing(conn: sqlite3.Connection) -> None:
        insert(3)(conn)
        raise RuntimeError("this request failed")

    bad = Writer(db, failing)
    good = Writer(db, insert(2))
    before = db.commits
    leader = group_of(db, insert(1), bad, good)
    for writer in (leader, bad, good):
        writer.join()

    assert isinstance(bad.error, RuntimeError)
    assert leader.error is None
    assert good.error is None
    assert db.commits == before + 1
    assert [committed(db, n) for n in (1, 2, 3)] == [True, True, False]


def test_a_failed_commit_is_told_to_every_member_and_keeps_nothing(db: Database) -> None:
    def orphan(conn: sqlite3.Connection) -> None:
        # A deferred foreign key is checked at COMMIT: the whole group's COMMIT fails.
        conn.execute("INSERT INTO children (id, parent) VALUES (1, 99)")

    bad = Writer(db, orphan)
    leader = group_of(db, insert(1), bad)
    leader.join()
    bad.join()

    assert isinstance(leader.error, sqlite3.IntegrityError)
    assert isinstance(bad.error, sqlite3.IntegrityError)
    assert not committed(db, 1)
    with db.write() as conn:  # the connection is usable again
        insert(4)(conn)
    assert committed(db, 4)


def test_under_a_full_disk_what_each_writer_is_told_is_what_was_stored(tmp_path: Path) -> None:
    opened = open_database(
        tmp_path / "small.db",
        service="test",
        master_key="a sufficiently long key",
        kdf_iterations=100_000,
        migrations=MIGRATIONS,
        synchronous="FULL",
        max_bytes=64 * 1024,
    )
    db = opened.database
    writers = [Writer(db, insert(n, bytes(1024))) for n in range(2, 5)]
    writers.append(Writer(db, insert(99, bytes(256 * 1024))))  # cannot fit
    leader = group_of(db, insert(1, bytes(1024)), *writers)
    for writer in [leader, *writers]:
        writer.join()

    assert isinstance(writers[-1].error, ResourceExhausted)
    for note_id, writer in zip((1, 2, 3, 4), [leader, *writers[:-1]], strict=True):
        assert (writer.error is None) == committed(db, note_id)
        assert writer.error is None or isinstance(writer.error, ResourceExhausted)
    assert not committed(db, 99)
    db.close()


def test_reads_see_only_committed_work(db: Database) -> None:
    inside, release = threading.Event(), threading.Event()

    def slow(conn: sqlite3.Connection) -> None:
        insert(1)(conn)
        inside.set()
        release.wait()

    writer = Writer(db, slow)
    writer.start()
    inside.wait()
    with db.read() as conn:  # does not wait for the writer, and does not see its row
        assert conn.execute("SELECT COUNT(*) FROM notes").fetchone()[0] == 0
    release.set()
    writer.join()
    with db.read(snapshot=False) as conn:
        assert conn.execute("SELECT COUNT(*) FROM notes").fetchone()[0] == 1


def test_a_member_whose_savepoint_cannot_be_released_is_rolled_back_alone(
    db: Database,
) -> None:
    def unreleasable(conn: sqlite3.Connection) -> None:
        insert(3)(conn)
        denied: list[str] = []

        def authorizer(action: int, arg1: str | None, *_: object) -> int:
            # Refuses this block's RELEASE once (as an I/O or lock error would fail it);
            # everything after, rolling back included, is allowed.
            if action == sqlite3.SQLITE_SAVEPOINT and arg1 == "RELEASE" and not denied:
                denied.append("RELEASE")
                return sqlite3.SQLITE_DENY
            return sqlite3.SQLITE_OK

        conn.set_authorizer(authorizer)

    bad = Writer(db, unreleasable)
    good = Writer(db, insert(2))
    leader = group_of(db, insert(1), bad, good)
    for writer in (leader, bad, good):
        writer.join()

    assert isinstance(bad.error, sqlite3.DatabaseError)
    assert leader.error is None
    assert good.error is None
    assert [committed(db, n) for n in (1, 2, 3)] == [True, True, False]
