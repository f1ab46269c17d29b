"""Authentication factors in identity's PostgreSQL database (tables from migration 3 in
postgres_store.py): the same columns, ciphers and associated data as the SQLite factor
store, so copied rows still open and recovery codes still match.

Replicas may change one user's factors at once, so every read-modify-write here locks the
user's factors row first (SELECT ... FOR UPDATE, created if missing with INSERT ... ON
CONFLICT DO NOTHING): the password failure count never loses an increment, a TOTP step or
a recovery code is accepted exactly once, an enrolment is activated once.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any

from services.common.audit_events import AuditRecord
from services.common.crypto import FieldCipher, Keyring
from services.common.postgres.database import Connection, PgDatabase
from services.common.postgres.outbox import PgOutbox
from services.common.postgres.rotation import PgEncryptedTable
from services.identity.model import NO_FACTORS, FactorState, NoSuchUser

_KEY_BYTES = 32
Row = dict[str, Any]


class PostgresFactorStore:
    """`FactorStore` in PostgreSQL, beside `PostgresIdentityStore` in the same database."""

    def __init__(self, db: PgDatabase, keyring: Keyring, outbox: PgOutbox) -> None:
        self._db = db
        self._outbox = outbox
        self._index = keyring.blind_index("users.user_id")
        # The row key is random and stable: users.user_index changes with key rotation.
        self._code_key = keyring.field("factors", "code_key")
        self._totp = keyring.field("factors", "totp_secret")
        self._pending = keyring.field("factors", "totp_pending")
        self._password = keyring.field("factors", "password")

    def rotatable(self) -> PgEncryptedTable:
        """Recovery-code digests stay valid: their key is re-sealed, not changed."""
        return PgEncryptedTable(
            self._db,
            "factors",
            "user_row",
            "row_key",
            [
                ("code_key_ct", self._code_key),  # first: never NULL, marks the row's version
                ("totp_secret_ct", self._totp),
                ("totp_pending_ct", self._pending),
                ("password_ct", self._password),
            ],
        )

    def _user_row(self, conn: Connection, user_id: str) -> int:
        row = conn.execute(
            "SELECT id FROM users WHERE user_index = ANY(%s) AND deactivate_time IS NULL",
            (self._index.candidates(user_id),),
        ).fetchone()
        if row is None:
            raise NoSuchUser
        return int(row["id"])

    def _locked_row(self, conn: Connection, user_id: str) -> Row:
        """The user's factors row, locked for this transaction; created (with a fresh
        recovery-code key) if missing."""
        user_row = self._user_row(conn, user_id)
        row_key = secrets.token_hex(16)
        conn.execute(
            "INSERT INTO factors (user_row, row_key, code_key_ct) VALUES (%s, %s, %s)"
            " ON CONFLICT (user_row) DO NOTHING",
            (
                user_row,
                row_key,
                self._code_key.encrypt(secrets.token_bytes(_KEY_BYTES), row_key.encode()),
            ),
        )
        row = conn.execute(
            "SELECT * FROM factors WHERE user_row = %s FOR UPDATE", (user_row,)
        ).fetchone()
        assert row is not None
        return row

    def _digest(self, row: Row, code: str) -> bytes:
        key = self._code_key.decrypt(bytes(row["code_key_ct"]), str(row["row_key"]).encode())
        return hmac.digest(key, code.encode(), "sha256")

    def get(self, user_id: str) -> FactorState | None:
        with self._db.read() as conn:
            try:
                user_row = self._user_row(conn, user_id)
            except NoSuchUser:
                return None
            row = conn.execute("SELECT * FROM factors WHERE user_row = %s", (user_row,)).fetchone()
            if row is None:
                return NO_FACTORS
            codes = conn.execute(
                "SELECT count(*) AS n FROM recovery_codes WHERE user_row = %s", (user_row,)
            ).fetchone()
        row_key = str(row["row_key"]).encode()

        def _open(column: str, cipher: FieldCipher) -> str | None:
            blob = row[column]
            return None if blob is None else cipher.decrypt_text(bytes(blob), row_key)

        return FactorState(
            totp_secret=_open("totp_secret_ct", self._totp),
            totp_pending=_open("totp_pending_ct", self._pending),
            totp_last_step=int(row["totp_last_step"]),
            password_hash=_open("password_ct", self._password),
            password_failures=int(row["password_failures"]),
            password_window_start=row["password_window_start"],
            recovery_codes=int(codes["n"]) if codes else 0,
        )

    def set_pending_totp(self, user_id: str, secret: str, audit: AuditRecord) -> None:
        with self._db.write() as conn:
            row = self._locked_row(conn, user_id)
            conn.execute(
                "UPDATE factors SET totp_pending_ct = %s WHERE user_row = %s",
                (self._pending.encrypt_text(secret, str(row["row_key"]).encode()), row["user_row"]),
            )
            self._outbox.add(conn, audit)

    def activate_totp(
        self, user_id: str, pending: str, step: int, codes: list[str], audit: AuditRecord
    ) -> bool:
        with self._db.write() as conn:
            row = self._locked_row(conn, user_id)
            row_key = str(row["row_key"]).encode()
            blob = row["totp_pending_ct"]
            if blob is None or not hmac.compare_digest(
                self._pending.decrypt_text(bytes(blob), row_key).encode(), pending.encode()
            ):
                return False
            conn.execute(
                "UPDATE factors SET totp_secret_ct = %s, totp_pending_ct = NULL,"
                " totp_last_step = %s WHERE user_row = %s",
                (self._totp.encrypt_text(pending, row_key), step, row["user_row"]),
            )
            self._replace_codes(conn, row, codes)
            self._outbox.add(conn, audit)
            return True

    def accept_totp_step(self, user_id: str, step: int) -> bool:
        # One conditional UPDATE: of two concurrent calls with the same step, the second
        # re-reads the row after the first commits and no longer matches.
        with self._db.write() as conn:
            user_row = self._user_row(conn, user_id)
            cursor = conn.execute(
                "UPDATE factors SET totp_last_step = %s WHERE user_row = %s"
                " AND totp_secret_ct IS NOT NULL AND totp_last_step < %s",
                (step, user_row, step),
            )
            return cursor.rowcount == 1

    def remove_totp(self, user_id: str, audit: AuditRecord) -> bool:
        with self._db.write() as conn:
            user_row = self._user_row(conn, user_id)
            cursor = conn.execute(
                "UPDATE factors SET totp_secret_ct = NULL, totp_pending_ct = NULL"
                " WHERE user_row = %s AND totp_secret_ct IS NOT NULL",
                (user_row,),
            )
            if cursor.rowcount != 1:
                return False
            self._outbox.add(conn, audit)
            return True

    def _replace_codes(self, conn: Connection, row: Row, codes: list[str]) -> None:
        conn.execute("DELETE FROM recovery_codes WHERE user_row = %s", (row["user_row"],))
        digests = list({self._digest(row, code) for code in codes})
        if digests:
            conn.execute(
                "INSERT INTO recovery_codes (user_row, digest) SELECT %s, unnest(%s::bytea[])",
                (row["user_row"], digests),
            )

    def replace_recovery_codes(self, user_id: str, codes: list[str], audit: AuditRecord) -> None:
        with self._db.write() as conn:
            self._replace_codes(conn, self._locked_row(conn, user_id), codes)
            self._outbox.add(conn, audit)

    def use_recovery_code(self, user_id: str, code: str, audit: AuditRecord) -> bool:
        with self._db.write() as conn:
            user_row = self._user_row(conn, user_id)
            row = conn.execute("SELECT * FROM factors WHERE user_row = %s", (user_row,)).fetchone()
            if row is None:
                return False
            # The DELETE removes the code once; a concurrent use finds it gone.
            cursor = conn.execute(
                "DELETE FROM recovery_codes WHERE user_row = %s AND digest = %s",
                (user_row, self._digest(row, code)),
            )
            if cursor.rowcount != 1:
                return False
            self._outbox.add(conn, audit)
            return True

    def set_password(self, user_id: str, password_hash: str, audit: AuditRecord) -> None:
        with self._db.write() as conn:
            row = self._locked_row(conn, user_id)
            conn.execute(
                "UPDATE factors SET password_ct = %s, password_failures = 0,"
                " password_window_start = NULL WHERE user_row = %s",
                (
                    self._password.encrypt_text(password_hash, str(row["row_key"]).encode()),
                    row["user_row"],
                ),
            )
            self._outbox.add(conn, audit)

    def rehash_password(
        self, user_id: str, old_hash: str, new_hash: str, audit: AuditRecord
    ) -> bool:
        with self._db.write() as conn:
            row = self._locked_row(conn, user_id)
            row_key = str(row["row_key"]).encode()
            blob = row["password_ct"]
            if blob is None or self._password.decrypt_text(bytes(blob), row_key) != old_hash:
                return False
            conn.execute(
                "UPDATE factors SET password_ct = %s WHERE user_row = %s",
                (self._password.encrypt_text(new_hash, row_key), row["user_row"]),
            )
            self._outbox.add(conn, audit)
            return True

    def record_password_failure(self, user_id: str, now: float, window: float) -> int | None:
        with self._db.write() as conn:
            try:
                row = self._locked_row(conn, user_id)
            except NoSuchUser:
                # One small write, as for a real account, so the answer's timing does not
                # tell whether the account exists.
                conn.execute("UPDATE password_decoy SET attempts = attempts + 1 WHERE id = 1")
                return None
            start = row["password_window_start"]
            fresh = start is None or start <= now - window
            failures = 1 if fresh else int(row["password_failures"]) + 1
            conn.execute(
                "UPDATE factors SET password_failures = %s, password_window_start = %s"
                " WHERE user_row = %s",
                (failures, now if fresh else start, row["user_row"]),
            )
            return failures

    def reset_password_budget(self, user_id: str) -> None:
        with self._db.write() as conn:
            user_row = self._user_row(conn, user_id)
            conn.execute(
                "UPDATE factors SET password_failures = 0, password_window_start = NULL"
                " WHERE user_row = %s AND password_failures > 0",
                (user_row,),
            )
