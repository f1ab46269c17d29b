"""Online key rotation on PostgreSQL: the same re-encryption, by one replica at a time.

`PgEncryptedTable` is the PostgreSQL twin of `rotation.EncryptedTable`: it brings the rows
of one table to the primary key version in batches, re-encrypting each field (and
recomputing a blind index) with the very same ciphers, so the bytes are those SQLite
would write. Batches are idempotent: a row already under the primary version is skipped,
so two replicas rotating at once would waste work but never corrupt a row. They do not
rotate at once anyway: `LeasedRotation` runs the rotation only on the replica holding the
`key-rotation` lease; the others keep serving and wait for it to finish (or to die, when
the lease passes to one of them and the rotation resumes where it stopped).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.common.crypto import FieldCipher
from services.common.postgres.database import Connection, PgDatabase
from services.common.postgres.lease import Lease
from services.common.rotation import KeyRotation, Reindex, RotationStatus, RowMac

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PgEncryptedTable:
    """One table whose encrypted columns share a row key (see rotation.EncryptedTable)."""

    db: PgDatabase
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
            return f"substring({self.row_mac.column} FROM 1 FOR 4) <> %s", version
        column, cipher = self.fields[0]
        # The key version sits in bytes 2-5 of the ciphertext header (see crypto.py).
        return f"substring({column} FROM 2 FOR 4) <> %s", struct.pack(">I", cipher.primary_version)

    def rotate_batch(self, after: int, limit: int) -> tuple[int, int]:
        stale, version = self._stale()
        with self.db.write() as conn:
            rows = conn.execute(
                f"SELECT * FROM {self.table} WHERE {self.id_column} > %s AND {stale}"  # noqa: S608
                f" ORDER BY {self.id_column} LIMIT %s FOR UPDATE SKIP LOCKED",
                (after, version, limit),
            ).fetchall()
            for row in rows:
                self._rotate_row(conn, row)
        last = rows[-1][self.id_column] if rows else after
        return int(last), len(rows)

    def _rotate_row(self, conn: Connection, row: dict[str, Any]) -> None:
        if self.row_mac is not None:  # a tampered row stops the rotation, never laundered
            self.row_mac.mac.check(row[self.row_mac.column], *self.row_mac.values(row))
        old_key = _as_bytes(row[self.row_key_column]) if self.fields else b""
        new_key = old_key
        updates: dict[str, object] = {}
        if self.reindex is not None:
            source = dict(self.fields)[self.reindex.source_column]
            plaintext = source.decrypt_text(bytes(row[self.reindex.source_column]), old_key)
            updates[self.reindex.index_column] = self.reindex.index(plaintext)
            if self.reindex.index_column == self.row_key_column:
                new_key = self.reindex.index(plaintext)
        for column, cipher in self.fields:
            if row[column] is not None:
                updates[column] = cipher.reencrypt(bytes(row[column]), old_key, new_key)
        if self.row_mac is not None:
            merged = {**row, **updates}
            updates[self.row_mac.column] = self.row_mac.mac.tag(*self.row_mac.values(merged))
        keys = list(self.key_columns) or [self.id_column]
        assignments = ", ".join(f"{column} = %s" for column in updates)
        where = " AND ".join(f"{column} = %s" for column in keys)
        conn.execute(
            f"UPDATE {self.table} SET {assignments} WHERE {where}",  # noqa: S608
            (*updates.values(), *(row[column] for column in keys)),
        )

    def remaining(self) -> int:
        stale, version = self._stale()
        with self.db.read(snapshot=False) as conn:
            row = conn.execute(
                f"SELECT count(*) AS n FROM {self.table} WHERE {stale}",  # noqa: S608
                (version,),
            ).fetchone()
        return int(row["n"]) if row else 0


def _as_bytes(value: str | bytes | memoryview) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


class LeasedRotation:
    """Runs a `KeyRotation` on whichever replica holds the rotation lease.

    Every replica calls `run()`; one wins the lease, renews it while it works, and
    releases it when done. The others poll: they stop once the old versions are retired,
    or take over the lease if its holder dies.
    """

    def __init__(
        self, rotation: KeyRotation, lease: Lease, db: PgDatabase, *, poll_seconds: float = 2.0
    ) -> None:
        self._rotation = rotation
        self.lease = lease
        self._db = db
        self._poll = poll_seconds
        self._primary = rotation.primary_version

    def status(self) -> RotationStatus:
        return self._rotation.status()

    async def run(self) -> None:
        if self._rotation.finished:
            return
        while True:
            if await asyncio.to_thread(self.lease.acquire):
                renew = asyncio.create_task(self._renew())
                try:
                    await self._rotation.run()
                finally:
                    renew.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await renew
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(self.lease.release)
                return
            if await asyncio.to_thread(self._retired_elsewhere):
                self._rotation.mark_finished()
                return
            await asyncio.sleep(self._poll)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.lease.ttl / 3)
            try:
                await asyncio.to_thread(self.lease.acquire)
            except Exception:  # the database is away: the next renewal tries again
                logger.warning("could not renew the key rotation lease")

    def _retired_elsewhere(self) -> bool:
        """Another replica finished: every version but the primary is retired."""
        with self._db.read(snapshot=False) as conn:
            row = conn.execute(
                "SELECT count(*) AS n FROM key_versions WHERE version <> %s AND version NOT IN"
                " (SELECT version FROM key_retirements)",
                (self._primary,),
            ).fetchone()
        return row is not None and int(row["n"]) == 0
