"""Online key rotation: re-encrypt every stored ciphertext under the primary key.

Start a service with a new DB_ENCRYPTION_KEY and the previous one in
DB_ENCRYPTION_OLD_KEYS. The database records a new key version; new writes use it at
once, and this background task walks each encrypted table in batches (one short write
transaction each, so RPCs keep being served), re-encrypting rows and recomputing blind
indexes. Progress is visible through DatabaseAdminService.GetKeyRotationStatus. When no
row needs an old version, the old versions are marked retired, an audit event is
recorded, and the log says the old key can be removed. A restart mid-way simply resumes:
rows already done are recognised by the key version in their ciphertext header.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from services.common import audit_events
from services.common.audit_events import AuditRecord, AuditSink
from services.common.crypto import BlindIndex, FieldCipher, Keyring, Mac, MacValue
from services.common.sqlite import Database, retire_versions

logger = logging.getLogger(__name__)


class Rotatable(Protocol):
    """A table (or set of tables) that can bring its rows to the primary key version."""

    def rotate_batch(self, after: int, limit: int) -> tuple[int, int]:
        """Rotates up to `limit` rows with id > `after`: (last id looked at, rows changed).

        The last id equals `after` when no row is left.
        """
        ...

    def remaining(self) -> int:
        """Rows still holding data under an older key version."""
        ...


@dataclass(frozen=True)
class Reindex:
    """A blind-index column recomputed from the plaintext of an encrypted column."""

    index_column: str
    index: BlindIndex
    source_column: str


# A row as SQLite returns it, or as a dict about to be written.
RowLike = Mapping[str, Any] | sqlite3.Row


@dataclass(frozen=True)
class RowMac:
    """A column holding each row's MAC, and the row values it authenticates."""

    column: str
    mac: Mac
    values: Callable[[RowLike], tuple[MacValue, ...]]


@dataclass(frozen=True)
class EncryptedTable:
    """Generic rotation of one table whose encrypted columns share a row key.

    `row_key_column` holds each row's key for associated data; when it is also the
    reindexed column (identity's users), fields move to the new row key with it. With a
    `row_mac`, each row's MAC is checked before anything is rewritten (a rotation stops
    at a tampered row rather than laundering it) and made again under the primary key.
    A table without encrypted fields rotates only its MACs. `key_columns` name one row
    (default: the id column), for tables whose id column is shared by several rows.
    """

    db: Database
    table: str
    id_column: str
    row_key_column: str
    fields: Sequence[tuple[str, FieldCipher]]
    reindex: Reindex | None = None
    row_mac: RowMac | None = None
    key_columns: Sequence[str] = ()

    def _stale(self) -> tuple[str, bytes]:
        if not self.fields:
            assert self.row_mac is not None, "a table with nothing to rotate"
            version = struct.pack(">I", self.row_mac.mac.primary_version)
            return f"substr({self.row_mac.column}, 1, 4) != ?", version
        column, cipher = self.fields[0]
        return f"substr({column}, 2, 4) != ?", struct.pack(">I", cipher.primary_version)

    def rotate_batch(self, after: int, limit: int) -> tuple[int, int]:
        stale, version = self._stale()
        with self.db.write() as conn:
            rows = conn.execute(
                f"SELECT * FROM {self.table} WHERE {self.id_column} > ? AND {stale}"  # noqa: S608
                f" ORDER BY {self.id_column} LIMIT ?",
                (after, version, limit),
            ).fetchall()
            for row in rows:
                self._rotate_row(conn, row)
        last = rows[-1][self.id_column] if rows else after
        return int(last), len(rows)

    def _rotate_row(self, conn: sqlite3.Connection, row: sqlite3.Row) -> None:
        current = {key: row[key] for key in row.keys()}  # noqa: SIM118 - a Row, not a dict
        if self.row_mac is not None:
            self.row_mac.mac.check(current[self.row_mac.column], *self.row_mac.values(current))
        old_key = _as_bytes(row[self.row_key_column]) if self.fields else b""
        new_key = old_key
        updates: dict[str, Any] = {}
        if self.reindex is not None:
            source = dict(self.fields)[self.reindex.source_column]
            plaintext = source.decrypt_text(row[self.reindex.source_column], old_key)
            updates[self.reindex.index_column] = self.reindex.index(plaintext)
            if self.reindex.index_column == self.row_key_column:
                new_key = self.reindex.index(plaintext)
        for column, cipher in self.fields:
            if row[column] is not None:
                updates[column] = cipher.reencrypt(row[column], old_key, new_key)
        if self.row_mac is not None:
            merged = {**current, **updates}
            updates[self.row_mac.column] = self.row_mac.mac.tag(*self.row_mac.values(merged))
        keys = list(self.key_columns) or [self.id_column]
        assignments = ", ".join(f"{column} = ?" for column in updates)
        where = " AND ".join(f"{column} = ?" for column in keys)
        conn.execute(
            f"UPDATE {self.table} SET {assignments} WHERE {where}",  # noqa: S608
            (*updates.values(), *(row[column] for column in keys)),
        )

    def remaining(self) -> int:
        stale, version = self._stale()
        with self.db.read() as conn:
            query = f"SELECT COUNT(*) FROM {self.table} WHERE {stale}"  # noqa: S608
            return int(conn.execute(query, (version,)).fetchone()[0])


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


@dataclass(frozen=True)
class RotationStatus:
    primary_version: int
    loaded_versions: list[int]
    rows_remaining: int
    rows_done: int
    old_keys_retirable: bool


class KeyRotation:
    def __init__(
        self,
        db: Database | None,
        keyring: Keyring,
        parts: Sequence[Rotatable],
        audit: AuditSink | None,
        *,
        batch_size: int = 500,
        pause_seconds: float = 0.01,
        retire: Callable[[int], list[int]] | None = None,
    ) -> None:
        """`retire(keep)` marks every key version but `keep` retired; by default in the
        SQLite `db` (PostgreSQL stores pass their own)."""
        if retire is None:
            assert db is not None, "KeyRotation needs the SQLite database or a retire function"
            sqlite_db = db
            retire = lambda keep: retire_versions(sqlite_db, keep)  # noqa: E731
        self._db = db
        self._retire = retire
        self._keyring = keyring
        self._parts = parts
        self._audit = audit
        self._batch = batch_size
        self._pause = pause_seconds
        self.rows_done = 0
        self._finished = not keyring.rotating

    @property
    def primary_version(self) -> int:
        return self._keyring.primary_version

    @property
    def finished(self) -> bool:
        return self._finished

    def mark_finished(self) -> None:
        """Another replica completed the rotation (see postgres.rotation.LeasedRotation)."""
        self._finished = True

    def status(self) -> RotationStatus:
        remaining = sum(part.remaining() for part in self._parts) if not self._finished else 0
        return RotationStatus(
            primary_version=self._keyring.primary_version,
            loaded_versions=self._keyring.versions,
            rows_remaining=remaining,
            rows_done=self.rows_done,
            old_keys_retirable=self._finished,
        )

    async def run(self) -> None:
        if self._finished:
            return
        logger.info(
            "key rotation started",
            extra={"fields": {"primary_version": self._keyring.primary_version}},
        )
        for part in self._parts:
            cursor = 0
            while True:
                last, changed = await asyncio.to_thread(part.rotate_batch, cursor, self._batch)
                self.rows_done += changed
                if last == cursor:
                    break
                cursor = last
                await asyncio.sleep(self._pause)  # let RPCs have the database in between
        remaining = await asyncio.to_thread(lambda: sum(p.remaining() for p in self._parts))
        if remaining:  # rows written under an old version meanwhile: go round again
            logger.info("key rotation pass left rows", extra={"fields": {"rows": remaining}})
            await self.run()
            return
        if self._db is not None:
            # The WAL may still hold page images from before re-encryption: fold it into
            # the main file (where secure_delete has zeroed what the re-encryption
            # replaced) and truncate it, before telling anyone the old key is not needed.
            while True:
                try:
                    await asyncio.to_thread(self._db.checkpoint)
                    break
                except RuntimeError:
                    logger.warning("key rotation waits for the WAL to be free to checkpoint")
                    await asyncio.sleep(1.0)
        retired = await asyncio.to_thread(self._retire, self._keyring.primary_version)
        self._finished = True
        if self._audit is not None:
            details = {"rows": str(self.rows_done), "retired_versions": ",".join(map(str, retired))}
            event = AuditRecord(audit_events.KEY_ROTATION_COMPLETED, "", details)
            await asyncio.to_thread(self._audit.record, event)
        logger.info(
            "key rotation complete: the old keys are no longer needed; remove "
            "DB_ENCRYPTION_OLD_KEYS and restart at your convenience",
            extra={"fields": {"rows": self.rows_done, "retired_versions": retired}},
        )


def rotation_from_env(
    db: Database,
    keyring: Keyring,
    parts: Sequence[Rotatable],
    audit: AuditSink | None,
    number: Callable[[str, float], float],
) -> KeyRotation:
    return KeyRotation(
        db,
        keyring,
        parts,
        audit,
        batch_size=int(number("KEY_ROTATION_BATCH_SIZE", 500)),
        pause_seconds=number("KEY_ROTATION_PAUSE_SECONDS", 0.01),
    )
