"""How an account's factors become a row and back: the same bytes and MACs on every
storage backend (services/identity/factor_store.py on SQLite, postgres_factors.py on
PostgreSQL), so a row copied from one to the other still opens and its MAC still holds.

Each `factors` row carries a MAC (purpose key `mac/row/factors`) over every column: the
owner's row id (a row moved or copied to another account fails), its row key, the
sealed recovery-code key, TOTP secret, pending enrolment and password hash, the last
accepted TOTP step, the password failure count and window start, and `recovery_set`, a
SHA-256 of the account's recovery-code digests (a code deleted, or a used one put back,
no longer matches it). Every active account has its row from registration on, so a row
deleted to remove a second factor or a password is an integrity failure too, as is a
row found for an account whose users row fails its own MAC.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

from services.common import metrics
from services.common.crypto import FieldCipher, Keyring, MacValue
from services.common.errors import IntegrityError
from services.common.rotation import RowLike, RowMac
from services.identity.model import FactorState

KEY_BYTES = 32
MAC_PURPOSE = "row/factors"


def factor_values(row: RowLike) -> tuple[MacValue, ...]:
    """What a factors row's MAC covers: every column but the MAC."""
    return (
        int(row["user_row"]),
        str(row["row_key"]),
        _blob(row["code_key_ct"]),
        _blob(row["totp_secret_ct"]),
        _blob(row["totp_pending_ct"]),
        int(row["totp_last_step"]),
        _blob(row["password_ct"]),
        int(row["password_failures"]),
        None if row["password_window_start"] is None else float(row["password_window_start"]),
        _blob(row["recovery_set"]),
    )


def _blob(value: bytes | memoryview | None) -> bytes | None:
    return None if value is None else bytes(value)


def recovery_set(digests: Iterable[bytes]) -> bytes:
    """One value for a set of recovery-code digests, whatever order they are read in."""
    ordered = sorted(bytes(d) for d in digests)
    return hashlib.sha256(b"".join(len(d).to_bytes(4, "big") + d for d in ordered)).digest()


class FactorSealing:
    """The ciphers and the MAC of identity's `factors` rows under one keyring."""

    def __init__(self, keyring: Keyring) -> None:
        # The row key is random and stable: users.user_index changes with key rotation.
        self.code_key = keyring.field("factors", "code_key")
        self.totp = keyring.field("factors", "totp_secret")
        self.pending = keyring.field("factors", "totp_pending")
        self.password = keyring.field("factors", "password")
        self.mac = keyring.mac(MAC_PURPOSE)
        self._label = f"{keyring.service}.{MAC_PURPOSE}"

    def encrypted_fields(self) -> list[tuple[str, FieldCipher]]:
        """Encrypted columns, for key rotation; the first is never NULL and marks the
        row's key version. Recovery-code digests stay valid: their key is re-sealed."""
        return [
            ("code_key_ct", self.code_key),
            ("totp_secret_ct", self.totp),
            ("totp_pending_ct", self.pending),
            ("password_ct", self.password),
        ]

    def row_mac(self) -> RowMac:
        return RowMac("row_mac", self.mac, factor_values)

    def new_row(self, user_row: int) -> dict[str, Any]:
        """A new account's sealed row: no factors yet, a fresh recovery-code key."""
        row_key = secrets.token_hex(16)
        row: dict[str, Any] = {
            "user_row": user_row,
            "row_key": row_key,
            "code_key_ct": self.code_key.encrypt(secrets.token_bytes(KEY_BYTES), row_key.encode()),
            "totp_secret_ct": None,
            "totp_pending_ct": None,
            "totp_last_step": 0,
            "password_ct": None,
            "password_failures": 0,
            "password_window_start": None,
            "recovery_set": recovery_set([]),
        }
        return self.seal(row)

    def seal(self, row: dict[str, Any]) -> dict[str, Any]:
        """`row` with its MAC made again (after a change to a checked row)."""
        row["row_mac"] = self.mac.tag(*factor_values(row))
        return row

    def check(self, row: Mapping[str, Any] | None, digests: Iterable[bytes]) -> dict[str, Any]:
        """An active account's row as a dict, once its MAC holds and `digests` (its
        recovery codes as stored) are the set it records; IntegrityError otherwise."""
        if row is None:
            raise self.failure("an active account has no factors row (deleted)")
        values = dict(row)
        self.mac.check(values["row_mac"], *factor_values(values))
        if not hmac.compare_digest(bytes(values["recovery_set"]), recovery_set(digests)):
            raise self.failure("recovery codes differ from the set the row records")
        return values

    def failure(self, reason: str) -> IntegrityError:
        """Counted and raised as a failed MAC is (crypto.Mac.check)."""
        metrics.INTEGRITY_FAILURES.labels(self._label).inc()
        return IntegrityError(f"{self._label}: {reason}")

    def digest(self, row: Mapping[str, Any], code: str) -> bytes:
        """A recovery code's digest under the row's sealed key."""
        key = self.code_key.decrypt(bytes(row["code_key_ct"]), str(row["row_key"]).encode())
        return hmac.digest(key, code.encode(), "sha256")

    def text(self, row: Mapping[str, Any], column: str, cipher: FieldCipher) -> str | None:
        """A sealed column of a checked row, opened (None when empty)."""
        blob = row[column]
        row_key = str(row["row_key"]).encode()
        return None if blob is None else cipher.decrypt_text(bytes(blob), row_key)

    def encrypt(self, row: Mapping[str, Any], cipher: FieldCipher, text: str) -> bytes:
        """`text` sealed for a column of `row` (bound to its row key)."""
        return cipher.encrypt_text(text, str(row["row_key"]).encode())

    def pending_is(self, row: Mapping[str, Any], secret: str) -> bool:
        """Whether `secret` is the row's pending enrolment (compared in constant time)."""
        pending = self.text(row, "totp_pending_ct", self.pending)
        return pending is not None and hmac.compare_digest(pending.encode(), secret.encode())

    def open(self, row: Mapping[str, Any], codes: int) -> FactorState:
        """The factors in a checked row with `codes` recovery codes left."""
        return FactorState(
            totp_secret=self.text(row, "totp_secret_ct", self.totp),
            totp_pending=self.text(row, "totp_pending_ct", self.pending),
            totp_last_step=int(row["totp_last_step"]),
            password_hash=self.text(row, "password_ct", self.password),
            password_failures=int(row["password_failures"]),
            password_window_start=row["password_window_start"],
            recovery_codes=codes,
        )

    def legacy(self, row: Mapping[str, Any], digests: Iterable[bytes]) -> dict[str, Any]:
        """A row from before factor MACs with its recovery codes, sealed as they are
        (once, at the upgrade)."""
        return self.seal({**row, "recovery_set": recovery_set(digests)})
