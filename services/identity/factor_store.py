"""Authentication factors in identity's SQLite file (tables from migrations 3 and 7 in
store.py; rows sealed and checked in factor_sealing.py, used in factor_rows.py).

What a stolen file shows: which (unnamed) accounts are active (each has a factors row),
the last TOTP time step accepted, the password failure count and when its window began,
and how many recovery codes each has left. TOTP secrets, pending enrolments, password
hashes and the recovery-code key are ChaCha20-Poly1305 ciphertext bound to their row;
recovery codes exist only as HMAC-SHA256 under that sealed per-user key. Without the
master key, nothing in the file lets anyone compute a TOTP code or test a password or
code guess, nor change, delete or move a factors row or a recovery code unnoticed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any

from services.common.crypto import Keyring
from services.common.outbox import SqliteOutbox
from services.common.rotation import EncryptedTable, Rotatable
from services.common.sqlite import Database, any_of
from services.identity.factor_rows import Row, SealedFactorStore
from services.identity.sealing import USER_COLUMNS


class SqliteFactorStore(SealedFactorStore[sqlite3.Connection]):
    """`FactorStore` in SQLite, beside `SqliteIdentityStore` in the same file. One writer
    at a time: a write transaction's reads and its change cannot interleave with another's."""

    def __init__(self, db: Database, keyring: Keyring, outbox: SqliteOutbox) -> None:
        super().__init__(keyring, outbox.add)
        self._db = db
        self._index = keyring.blind_index("users.user_id")
        self._user_match = f"user_index IN {any_of(range(self._index.versions))}"

    def rotatable(self) -> Rotatable:
        """The table key rotation re-encrypts and re-MACs (registered by the wiring)."""
        return EncryptedTable(
            self._db,
            "factors",
            "user_row",
            "row_key",
            self._sealing.encrypted_fields(),
            row_mac=self._sealing.row_mac(),
        )

    def _read(self) -> AbstractContextManager[sqlite3.Connection]:
        return self._db.read()

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        return self._db.write()

    def _user(
        self, conn: sqlite3.Connection, user_id: str, *, lock: bool
    ) -> Mapping[str, Any] | None:
        row = conn.execute(
            f"SELECT {USER_COLUMNS} FROM users"  # noqa: S608
            f" WHERE {self._user_match} AND deactivate_time IS NULL",
            self._index.candidates(user_id),
        ).fetchone()
        return None if row is None else _as_dict(row)

    def _factors(
        self, conn: sqlite3.Connection, user_row: int, *, lock: bool
    ) -> Mapping[str, Any] | None:
        row = conn.execute("SELECT * FROM factors WHERE user_row = ?", (user_row,)).fetchone()
        return None if row is None else _as_dict(row)

    def _digests(self, conn: sqlite3.Connection, user_row: int) -> list[bytes]:
        rows = conn.execute("SELECT digest FROM recovery_codes WHERE user_row = ?", (user_row,))
        return [bytes(row[0]) for row in rows]

    def _update(self, conn: sqlite3.Connection, row: Row, columns: Iterable[str]) -> None:
        assignments = ", ".join(f"{column} = :{column}" for column in (*columns, "row_mac"))
        conn.execute(f"UPDATE factors SET {assignments} WHERE user_row = :user_row", row)  # noqa: S608

    def _replace_digests(
        self, conn: sqlite3.Connection, user_row: int, digests: list[bytes]
    ) -> None:
        conn.execute("DELETE FROM recovery_codes WHERE user_row = ?", (user_row,))
        conn.executemany(
            "INSERT INTO recovery_codes (user_row, digest) VALUES (?, ?)",
            [(user_row, digest) for digest in digests],
        )

    def _decoy_write(self, conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE password_decoy SET attempts = attempts + 1 WHERE id = 1")


def _as_dict(row: sqlite3.Row) -> dict[str, Any]:
    return {key: row[key] for key in row.keys()}  # noqa: SIM118 - a Row, not a dict
