"""Authentication factors in identity's PostgreSQL database (tables from migrations 3 and
7 in postgres_store.py): the same columns, ciphers, associated data and row MACs as the
SQLite factor store (factor_sealing.py), so copied rows still open, their MACs hold and
recovery codes still match.

Replicas may change one user's factors at once, so every change here locks the user's
users and factors rows first (SELECT ... FOR UPDATE; factor_rows.py checks and seals
them): the password failure count never loses an increment, a TOTP step or a recovery
code is accepted exactly once, an enrolment is activated once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any

from services.common.crypto import Keyring
from services.common.postgres.database import Connection, PgDatabase
from services.common.postgres.outbox import PgOutbox
from services.common.postgres.rotation import PgEncryptedTable
from services.identity.factor_rows import Row, SealedFactorStore
from services.identity.sealing import USER_COLUMNS


class PostgresFactorStore(SealedFactorStore[Connection]):
    """`FactorStore` in PostgreSQL, beside `PostgresIdentityStore` in the same database."""

    def __init__(self, db: PgDatabase, keyring: Keyring, outbox: PgOutbox) -> None:
        super().__init__(keyring, outbox.add)
        self._db = db
        self._index = keyring.blind_index("users.user_id")

    def rotatable(self) -> PgEncryptedTable:
        """The table key rotation re-encrypts and re-MACs (registered by the wiring)."""
        return PgEncryptedTable(
            self._db,
            "factors",
            "user_row",
            "row_key",
            self._sealing.encrypted_fields(),
            row_mac=self._sealing.row_mac(),
        )

    def _read(self) -> AbstractContextManager[Connection]:
        return self._db.read()

    def _write(self) -> AbstractContextManager[Connection]:
        return self._db.write()

    def _user(self, conn: Connection, user_id: str, *, lock: bool) -> Mapping[str, Any] | None:
        # FOR SHARE: a concurrent deactivation waits for this change (and this one for it).
        return conn.execute(
            f"SELECT {USER_COLUMNS} FROM users"  # noqa: S608
            " WHERE user_index = ANY(%s) AND deactivate_time IS NULL"
            + (" FOR SHARE" if lock else ""),
            (self._index.candidates(user_id),),
        ).fetchone()

    def _factors(self, conn: Connection, user_row: int, *, lock: bool) -> Mapping[str, Any] | None:
        return conn.execute(
            "SELECT * FROM factors WHERE user_row = %s"  # noqa: S608 - fixed text
            + (" FOR UPDATE" if lock else ""),
            (user_row,),
        ).fetchone()

    def _digests(self, conn: Connection, user_row: int) -> list[bytes]:
        rows = conn.execute("SELECT digest FROM recovery_codes WHERE user_row = %s", (user_row,))
        return [bytes(row["digest"]) for row in rows]

    def _update(self, conn: Connection, row: Row, columns: Iterable[str]) -> None:
        assignments = ", ".join(f"{column} = %({column})s" for column in (*columns, "row_mac"))
        conn.execute(
            f"UPDATE factors SET {assignments} WHERE user_row = %(user_row)s",  # noqa: S608
            row,
        )

    def _replace_digests(self, conn: Connection, user_row: int, digests: list[bytes]) -> None:
        conn.execute("DELETE FROM recovery_codes WHERE user_row = %s", (user_row,))
        if digests:
            conn.execute(
                "INSERT INTO recovery_codes (user_row, digest) SELECT %s, unnest(%s::bytea[])",
                (user_row, digests),
            )

    def _decoy_write(self, conn: Connection) -> None:
        conn.execute("UPDATE password_decoy SET attempts = attempts + 1 WHERE id = 1")
