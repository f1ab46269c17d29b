"""Authentication factors in identity's SQLite file (tables from migration 3 in store.py).

What a stolen file shows: which (unnamed) accounts have a factors row, the last TOTP
time step accepted, the password failure count and when its window began, and how many
recovery codes each has left. TOTP secrets, pending enrolments, password hashes and the
recovery-code key are ChaCha20-Poly1305 ciphertext bound to their row; recovery codes
exist only as HMAC-SHA256 under that sealed per-user key. Without the master key,
nothing in the file lets anyone compute a TOTP code or test a password or code guess.
"""

from __future__ import annotations

import hmac
import secrets
import sqlite3

from services.common.audit_events import AuditRecord
from services.common.crypto import FieldCipher, Keyring
from services.common.outbox import SqliteOutbox
from services.common.rotation import EncryptedTable, Rotatable
from services.common.sqlite import Database, any_of
from services.identity.model import NO_FACTORS, FactorState, NoSuchUser

_KEY_BYTES = 32


class SqliteFactorStore:
    """`FactorStore` in SQLite, beside `SqliteIdentityStore` in the same file."""

    def __init__(self, db: Database, keyring: Keyring, outbox: SqliteOutbox) -> None:
        self._db = db
        self._outbox = outbox
        self._index = keyring.blind_index("users.user_id")
        self._user_match = f"user_index IN {any_of(range(self._index.versions))}"
        # The row key is random and stable: users.user_index changes with key rotation.
        self._code_key = keyring.field("factors", "code_key")
        self._totp = keyring.field("factors", "totp_secret")
        self._pending = keyring.field("factors", "totp_pending")
        self._password = keyring.field("factors", "password")

    def rotatable(self) -> Rotatable:
        """The table key rotation re-encrypts (registered by the wiring). Recovery-code
        digests stay valid: their key is re-sealed, not changed."""
        return EncryptedTable(
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

    def _user_row(self, conn: sqlite3.Connection, user_id: str) -> int:
        row = conn.execute(
            f"SELECT id FROM users WHERE {self._user_match} AND deactivate_time IS NULL",  # noqa: S608
            self._index.candidates(user_id),
        ).fetchone()
        if row is None:
            raise NoSuchUser
        return int(row[0])

    def _factors_row(self, conn: sqlite3.Connection, user_id: str) -> sqlite3.Row:
        """The user's factors row, created (with a fresh recovery-code key) if missing."""
        user_row = self._user_row(conn, user_id)
        row = conn.execute("SELECT * FROM factors WHERE user_row = ?", (user_row,)).fetchone()
        if row is not None:
            return row  # type: ignore[no-any-return]
        row_key = secrets.token_hex(16)
        conn.execute(
            "INSERT INTO factors (user_row, row_key, code_key_ct) VALUES (?, ?, ?)",
            (
                user_row,
                row_key,
                self._code_key.encrypt(secrets.token_bytes(_KEY_BYTES), row_key.encode()),
            ),
        )
        return conn.execute(  # type: ignore[no-any-return]
            "SELECT * FROM factors WHERE user_row = ?", (user_row,)
        ).fetchone()

    def _digest(self, row: sqlite3.Row, code: str) -> bytes:
        key = self._code_key.decrypt(row["code_key_ct"], row["row_key"].encode())
        return hmac.digest(key, code.encode(), "sha256")

    def get(self, user_id: str) -> FactorState | None:
        with self._db.read() as conn:
            user = conn.execute(
                f"SELECT id FROM users WHERE {self._user_match} AND deactivate_time IS NULL",  # noqa: S608
                self._index.candidates(user_id),
            ).fetchone()
            if user is None:
                return None
            row = conn.execute("SELECT * FROM factors WHERE user_row = ?", (user[0],)).fetchone()
            if row is None:
                return NO_FACTORS
            codes = conn.execute(
                "SELECT COUNT(*) FROM recovery_codes WHERE user_row = ?", (user[0],)
            ).fetchone()[0]
        row_key = row["row_key"].encode()

        def _open(column: str, cipher: FieldCipher) -> str | None:
            blob = row[column]
            return None if blob is None else cipher.decrypt_text(blob, row_key)

        return FactorState(
            totp_secret=_open("totp_secret_ct", self._totp),
            totp_pending=_open("totp_pending_ct", self._pending),
            totp_last_step=row["totp_last_step"],
            password_hash=_open("password_ct", self._password),
            password_failures=row["password_failures"],
            password_window_start=row["password_window_start"],
            recovery_codes=int(codes),
        )

    def set_pending_totp(self, user_id: str, secret: str, audit: AuditRecord) -> None:
        with self._db.write() as conn:
            row = self._factors_row(conn, user_id)
            conn.execute(
                "UPDATE factors SET totp_pending_ct = ? WHERE user_row = ?",
                (self._pending.encrypt_text(secret, row["row_key"].encode()), row["user_row"]),
            )
            self._outbox.add(conn, audit)

    def activate_totp(
        self, user_id: str, pending: str, step: int, codes: list[str], audit: AuditRecord
    ) -> bool:
        with self._db.write() as conn:
            row = self._factors_row(conn, user_id)
            row_key = row["row_key"].encode()
            blob = row["totp_pending_ct"]
            if blob is None or not hmac.compare_digest(
                self._pending.decrypt_text(blob, row_key).encode(), pending.encode()
            ):
                return False
            conn.execute(
                """UPDATE factors SET totp_secret_ct = ?, totp_pending_ct = NULL,
                       totp_last_step = ? WHERE user_row = ?""",
                (self._totp.encrypt_text(pending, row_key), step, row["user_row"]),
            )
            self._replace_codes(conn, row, codes)
            self._outbox.add(conn, audit)
            return True

    def accept_totp_step(self, user_id: str, step: int) -> bool:
        # One conditional UPDATE: of two concurrent calls with the same step, exactly one
        # changes the row (the same statement is atomic on PostgreSQL too).
        with self._db.write() as conn:
            user_row = self._user_row(conn, user_id)
            cursor = conn.execute(
                """UPDATE factors SET totp_last_step = ?
                   WHERE user_row = ? AND totp_secret_ct IS NOT NULL AND totp_last_step < ?""",
                (step, user_row, step),
            )
            return cursor.rowcount == 1

    def remove_totp(self, user_id: str, audit: AuditRecord) -> bool:
        with self._db.write() as conn:
            user_row = self._user_row(conn, user_id)
            cursor = conn.execute(
                """UPDATE factors SET totp_secret_ct = NULL, totp_pending_ct = NULL
                   WHERE user_row = ? AND totp_secret_ct IS NOT NULL""",
                (user_row,),
            )
            if cursor.rowcount != 1:
                return False
            self._outbox.add(conn, audit)
            return True

    def _replace_codes(self, conn: sqlite3.Connection, row: sqlite3.Row, codes: list[str]) -> None:
        conn.execute("DELETE FROM recovery_codes WHERE user_row = ?", (row["user_row"],))
        conn.executemany(
            "INSERT INTO recovery_codes (user_row, digest) VALUES (?, ?)",
            [(row["user_row"], self._digest(row, code)) for code in codes],
        )

    def replace_recovery_codes(self, user_id: str, codes: list[str], audit: AuditRecord) -> None:
        with self._db.write() as conn:
            self._replace_codes(conn, self._factors_row(conn, user_id), codes)
            self._outbox.add(conn, audit)

    def use_recovery_code(self, user_id: str, code: str, audit: AuditRecord) -> bool:
        with self._db.write() as conn:
            user_row = self._user_row(conn, user_id)
            row = conn.execute("SELECT * FROM factors WHERE user_row = ?", (user_row,)).fetchone()
            if row is None:
                return False
            cursor = conn.execute(
                "DELETE FROM recovery_codes WHERE user_row = ? AND digest = ?",
                (user_row, self._digest(row, code)),
            )
            if cursor.rowcount != 1:
                return False
            self._outbox.add(conn, audit)
            return True

    def set_password(self, user_id: str, password_hash: str, audit: AuditRecord) -> None:
        with self._db.write() as conn:
            row = self._factors_row(conn, user_id)
            conn.execute(
                """UPDATE factors SET password_ct = ?, password_failures = 0,
                       password_window_start = NULL WHERE user_row = ?""",
                (
                    self._password.encrypt_text(password_hash, row["row_key"].encode()),
                    row["user_row"],
                ),
            )
            self._outbox.add(conn, audit)

    def rehash_password(
        self, user_id: str, old_hash: str, new_hash: str, audit: AuditRecord
    ) -> bool:
        with self._db.write() as conn:
            row = self._factors_row(conn, user_id)
            row_key = row["row_key"].encode()
            blob = row["password_ct"]
            if blob is None or self._password.decrypt_text(blob, row_key) != old_hash:
                return False
            conn.execute(
                "UPDATE factors SET password_ct = ? WHERE user_row = ?",
                (self._password.encrypt_text(new_hash, row_key), row["user_row"]),
            )
            self._outbox.add(conn, audit)
            return True

    def record_password_failure(self, user_id: str, now: float, window: float) -> int | None:
        with self._db.write() as conn:
            try:
                row = self._factors_row(conn, user_id)
            except NoSuchUser:
                # One small write, as for a real account, so the answer's timing does not
                # tell whether the account exists.
                conn.execute("UPDATE password_decoy SET attempts = attempts + 1 WHERE id = 1")
                return None
            fresh = row["password_window_start"] is None or (
                row["password_window_start"] <= now - window
            )
            conn.execute(
                """UPDATE factors SET password_failures = ?, password_window_start = ?
                   WHERE user_row = ?""",
                (
                    1 if fresh else row["password_failures"] + 1,
                    now if fresh else row["password_window_start"],
                    row["user_row"],
                ),
            )
            return 1 if fresh else int(row["password_failures"]) + 1

    def reset_password_budget(self, user_id: str) -> None:
        with self._db.write() as conn:
            user_row = self._user_row(conn, user_id)
            conn.execute(
                """UPDATE factors SET password_failures = 0, password_window_start = NULL
                   WHERE user_row = ? AND password_failures > 0""",
                (user_row,),
            )
