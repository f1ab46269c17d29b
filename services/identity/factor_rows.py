"""The `FactorStore` use of sealed factors rows, written once for every backend.

Each change reads the account's users row and factors row, checks both MACs (and the
recovery-code set the factors row records) before using anything, changes the row and
seals it again, in one write transaction: a tampered row is never sealed as if it were
sound, and a step, code or budget decision is taken on checked values only. A backend
(SQLite in factor_store.py, PostgreSQL in postgres_factors.py) supplies the SQL: how to
find and lock the rows, update one and replace the codes. On PostgreSQL the rows are
locked (SELECT ... FOR UPDATE) before they are read for a change, so two replicas never
both accept one TOTP step or recovery code, nor lose a password failure.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Generic, TypeVar

from services.common.audit_events import AuditRecord
from services.common.crypto import Keyring
from services.identity.factor_sealing import FactorSealing, recovery_set
from services.identity.model import FactorState, NoSuchUser
from services.identity.sealing import UserSealing

C = TypeVar("C")
Row = dict[str, Any]


class SealedFactorStore(ABC, Generic[C]):
    """`FactorStore` over a backend's connections of type C."""

    def __init__(self, keyring: Keyring, add_event: Callable[[C, AuditRecord], None]) -> None:
        self._sealing = FactorSealing(keyring)
        self._users = UserSealing(keyring)
        self._add_event = add_event

    # --- what a backend supplies ------------------------------------------------------

    @abstractmethod
    def _read(self) -> AbstractContextManager[C]:
        """A read transaction seeing one snapshot."""

    @abstractmethod
    def _write(self) -> AbstractContextManager[C]:
        """A write transaction."""

    @abstractmethod
    def _user(self, conn: C, user_id: str, *, lock: bool) -> Mapping[str, Any] | None:
        """The active account's users row (every column), not yet checked."""

    @abstractmethod
    def _factors(self, conn: C, user_row: int, *, lock: bool) -> Mapping[str, Any] | None:
        """The account's factors row (every column), not yet checked."""

    @abstractmethod
    def _digests(self, conn: C, user_row: int) -> list[bytes]:
        """The account's recovery-code digests as stored."""

    @abstractmethod
    def _update(self, conn: C, row: Row, columns: Iterable[str]) -> None:
        """Writes `columns` (and row_mac) of `row` to its factors row."""

    @abstractmethod
    def _replace_digests(self, conn: C, user_row: int, digests: list[bytes]) -> None:
        """Makes `digests` the account's recovery codes, and nothing else."""

    @abstractmethod
    def _decoy_write(self, conn: C) -> None:
        """One small write, as for a real account (see record_password_failure)."""

    # --- reading and changing checked rows --------------------------------------------

    def _user_row(self, conn: C, user_id: str, *, lock: bool) -> int:
        user = self._user(conn, user_id, lock=lock)
        if user is None:
            raise NoSuchUser
        return int(self._users.check(user)["id"])

    def _checked(self, conn: C, user_id: str) -> tuple[Row, list[bytes]]:
        """The account's checked factors row, locked, and its recovery-code digests."""
        user_row = self._user_row(conn, user_id, lock=True)
        row = self._factors(conn, user_row, lock=True)
        # Read once the row is locked: a concurrent change of the codes has committed.
        digests = self._digests(conn, user_row)
        return self._sealing.check(row, digests), digests

    def _change(self, conn: C, row: Row, **change: object) -> Row:
        """Writes `change` into a checked row and seals the row again."""
        new = self._sealing.seal({**row, **change})
        self._update(conn, new, change)
        return new

    def _set_codes(self, conn: C, row: Row, codes: list[str], **change: object) -> None:
        digests = list({self._sealing.digest(row, code) for code in codes})
        self._replace_digests(conn, int(row["user_row"]), digests)
        self._change(conn, row, recovery_set=recovery_set(digests), **change)

    # --- FactorStore ------------------------------------------------------------------

    def get(self, user_id: str) -> FactorState | None:
        with self._read() as conn:
            try:
                user_row = self._user_row(conn, user_id, lock=False)
            except NoSuchUser:
                return None
            digests = self._digests(conn, user_row)
            row = self._sealing.check(self._factors(conn, user_row, lock=False), digests)
        return self._sealing.open(row, len(digests))

    def set_pending_totp(self, user_id: str, secret: str, audit: AuditRecord) -> None:
        with self._write() as conn:
            row, _ = self._checked(conn, user_id)
            self._change(
                conn, row, totp_pending_ct=self._sealing.encrypt(row, self._sealing.pending, secret)
            )
            self._add_event(conn, audit)

    def activate_totp(
        self, user_id: str, pending: str, step: int, codes: list[str], audit: AuditRecord
    ) -> bool:
        with self._write() as conn:
            row, _ = self._checked(conn, user_id)
            if not self._sealing.pending_is(row, pending):
                return False
            self._set_codes(
                conn,
                row,
                codes,
                totp_secret_ct=self._sealing.encrypt(row, self._sealing.totp, pending),
                totp_pending_ct=None,
                totp_last_step=step,
            )
            self._add_event(conn, audit)
            return True

    def accept_totp_step(self, user_id: str, step: int) -> bool:
        # Decided on the checked row inside the write transaction (locked on PostgreSQL):
        # of two concurrent calls with the same step, exactly one changes it.
        with self._write() as conn:
            row, _ = self._checked(conn, user_id)
            if row["totp_secret_ct"] is None or int(row["totp_last_step"]) >= step:
                return False
            self._change(conn, row, totp_last_step=step)
            return True

    def remove_totp(self, user_id: str, audit: AuditRecord) -> bool:
        with self._write() as conn:
            row, _ = self._checked(conn, user_id)
            if row["totp_secret_ct"] is None:
                return False
            self._change(conn, row, totp_secret_ct=None, totp_pending_ct=None)
            self._add_event(conn, audit)
            return True

    def replace_recovery_codes(self, user_id: str, codes: list[str], audit: AuditRecord) -> None:
        with self._write() as conn:
            row, _ = self._checked(conn, user_id)
            self._set_codes(conn, row, codes)
            self._add_event(conn, audit)

    def use_recovery_code(self, user_id: str, code: str, audit: AuditRecord) -> bool:
        with self._write() as conn:
            row, digests = self._checked(conn, user_id)
            digest = self._sealing.digest(row, code)
            if digest not in digests:
                return False
            left = [d for d in digests if d != digest]
            self._replace_digests(conn, int(row["user_row"]), left)
            self._change(conn, row, recovery_set=recovery_set(left))
            self._add_event(conn, audit)
            return True

    def set_password(self, user_id: str, password_hash: str, audit: AuditRecord) -> None:
        with self._write() as conn:
            row, _ = self._checked(conn, user_id)
            self._change(
                conn,
                row,
                password_ct=self._sealing.encrypt(row, self._sealing.password, password_hash),
                password_failures=0,
                password_window_start=None,
            )
            self._add_event(conn, audit)

    def rehash_password(
        self, user_id: str, old_hash: str, new_hash: str, audit: AuditRecord
    ) -> bool:
        with self._write() as conn:
            row, _ = self._checked(conn, user_id)
            if self._sealing.text(row, "password_ct", self._sealing.password) != old_hash:
                return False
            self._change(
                conn, row, password_ct=self._sealing.encrypt(row, self._sealing.password, new_hash)
            )
            self._add_event(conn, audit)
            return True

    def record_password_failure(self, user_id: str, now: float, window: float) -> int | None:
        with self._write() as conn:
            try:
                row, _ = self._checked(conn, user_id)
            except NoSuchUser:
                # One small write, as for a real account, so the answer's timing does not
                # tell whether the account exists.
                self._decoy_write(conn)
                return None
            start = row["password_window_start"]
            fresh = start is None or start <= now - window
            failures = 1 if fresh else int(row["password_failures"]) + 1
            self._change(
                conn,
                row,
                password_failures=failures,
                password_window_start=now if fresh else start,
            )
            return failures

    def reset_password_budget(self, user_id: str) -> None:
        with self._write() as conn:
            row, _ = self._checked(conn, user_id)
            if int(row["password_failures"]) > 0:
                self._change(conn, row, password_failures=0, password_window_start=None)
