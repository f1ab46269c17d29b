"""Opening a service database: creation, persistence, and refusing to start."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from services.common.errors import ResourceExhausted, StartupError
from services.common.sqlite import Migration, OpenedDatabase, open_database

MIGRATIONS = [
    Migration(1, "CREATE TABLE notes (id INTEGER PRIMARY KEY, body BLOB NOT NULL) STRICT;"),
]


def open_notes(path: Path, key: str = "a sufficiently long key", **kw: object) -> OpenedDatabase:
    return open_database(
        path,
        service="test",
        master_key=key,
        kdf_iterations=100_000,
        migrations=kw.pop("migrations", MIGRATIONS),  # type: ignore[arg-type]
        synchronous="FULL",
        max_bytes=kw.pop("max_bytes", 0),  # type: ignore[arg-type]
    )


def test_a_new_database_is_created_in_wal_mode_with_a_key_version(tmp_path: Path) -> None:
    opened = open_notes(tmp_path / "sub" / "notes.db")
    with opened.database.read() as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("SELECT COUNT(*) FROM key_versions").fetchone()[0] == 1
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    opened.database.close()


def test_data_and_key_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    first = open_notes(path)
    cipher = first.keyring.field("notes", "body")
    with first.database.write() as conn:
        conn.execute(
            "INSERT INTO notes (id, body) VALUES (1, ?)", (cipher.encrypt_text("hi", b"1"),)
        )
    first.database.close()

    second = open_notes(path)
    with second.database.read() as conn:
        blob = conn.execute("SELECT body FROM notes WHERE id = 1").fetchone()[0]
    assert second.keyring.field("notes", "body").decrypt_text(blob, b"1") == "hi"
    second.database.close()


def test_a_failed_write_block_rolls_back(tmp_path: Path) -> None:
    opened = open_notes(tmp_path / "notes.db")

    def failing_write() -> None:
        with opened.database.write() as conn:
            conn.execute("INSERT INTO notes (id, body) VALUES (1, x'00')")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        failing_write()
    with opened.database.read() as conn:
        assert conn.execute("SELECT COUNT(*) FROM notes").fetchone()[0] == 0
    opened.database.close()


def test_a_wrong_key_refuses_and_touches_nothing(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    open_notes(path).database.close()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    with pytest.raises(StartupError, match=r"does not unlock notes\.db"):
        open_notes(path, key="not the key it was made with")

    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_file_that_is_not_a_database_refuses(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StartupError, match="not a readable SQLite database"):
        open_notes(path)
    assert path.read_bytes() == b"this is not sqlite at all" * 100


def test_a_database_from_a_newer_release_refuses(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    newer = [*MIGRATIONS, Migration(2, "CREATE TABLE extra (id INTEGER PRIMARY KEY);")]
    open_notes(path, migrations=newer).database.close()
    with pytest.raises(StartupError, match="newer than this release"):
        open_notes(path)


def test_migrations_apply_in_order_on_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    open_notes(path).database.close()
    newer = [*MIGRATIONS, Migration(2, "ALTER TABLE notes ADD COLUMN tag TEXT;")]
    opened = open_notes(path, migrations=newer)
    with opened.database.read() as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(notes)")]
    assert columns == ["id", "body", "tag"]
    opened.database.close()


def test_misnumbered_migrations_are_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="without gaps"):
        open_notes(tmp_path / "x.db", migrations=[Migration(2, "SELECT 1;")])


def test_a_second_process_on_the_same_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    first = open_notes(path)
    with pytest.raises(StartupError, match="in use by another process"):
        open_notes(path)
    first.database.close()
    open_notes(path).database.close()  # free again once the first one closed


def test_a_snapshot_is_a_consistent_readable_copy(tmp_path: Path) -> None:
    opened = open_notes(tmp_path / "notes.db")
    with opened.database.write() as conn:
        conn.executemany(
            "INSERT INTO notes (id, body) VALUES (?, x'01')", [(i,) for i in range(50)]
        )
    opened.database.snapshot(tmp_path / "copy.db")
    opened.database.close()
    copy = sqlite3.connect(tmp_path / "copy.db")
    assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert copy.execute("SELECT COUNT(*) FROM notes").fetchone()[0] == 50
    copy.close()


def test_a_full_database_is_resource_exhausted_and_keeps_nothing_of_the_write(
    tmp_path: Path,
) -> None:
    opened = open_notes(tmp_path / "notes.db", max_bytes=256 * 1024)

    def too_much() -> None:
        with opened.database.write() as conn:
            conn.execute("INSERT INTO notes (id, body) VALUES (1, x'00')")
            conn.execute("INSERT INTO notes (id, body) VALUES (2, zeroblob(1000000))")

    with pytest.raises(ResourceExhausted, match="storage is full"):
        too_much()
    with opened.database.read() as conn:
        assert conn.execute("SELECT COUNT(*) FROM notes").fetchone()[0] == 0
    opened.database.close()


def test_other_errors_that_mention_full_stay_what_they_are(tmp_path: Path) -> None:
    opened = open_notes(tmp_path / "notes.db")

    def typo() -> None:
        with opened.database.write() as conn:
            conn.execute("SELECT * FROM fullness")

    with pytest.raises(sqlite3.OperationalError, match="no such table: fullness"):
        typo()
    opened.database.close()


def test_a_file_from_before_the_key_tables_had_migrations_is_brought_up_to_date(
    tmp_path: Path,
) -> None:
    path = tmp_path / "notes.db"
    open_notes(path).database.close()
    old = sqlite3.connect(path)  # as the previous release left it
    old.executescript("DROP TABLE key_retirements; DROP TABLE securemsg_schema;")
    old.close()
    opened = open_notes(path)
    with opened.database.read() as conn:
        assert conn.execute("SELECT version FROM securemsg_schema").fetchone()[0] == 2
        assert conn.execute("SELECT COUNT(*) FROM key_retirements").fetchone()[0] == 0
    opened.database.close()
    newer = sqlite3.connect(path)
    newer.execute("UPDATE securemsg_schema SET version = 3")
    newer.commit()
    newer.close()
    with pytest.raises(StartupError, match="newer than this release"):
        open_notes(path)
