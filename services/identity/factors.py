"""Authentication factors, independent of gRPC: TOTP, recovery codes, the password, and
the checks the session service asks for (step-up codes, password logins).

Identity owns factors because it owns accounts; session owns logins and decides what a
session may do with the answers (see docs/ARCHITECTURE.md, "Factors and assurance").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from services.common import audit_events, validation
from services.common.audit_events import AuditRecord, AuditSink
from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
)
from services.common.ratelimit import CounterFactory, local_counters
from services.identity import passwords, recovery_codes, totp
from services.identity.model import FactorState, FactorStore, IdentityStore, NoSuchUser
from services.identity.passwords import PasswordHasher

# Which second factor was proven (the names match SecondFactor in the internal proto).
NONE = "none"
TOTP = "totp"
RECOVERY_CODE = "recovery_code"

CODE_REFUSED = "the code is wrong, already used or expired; use the current code"
RECOVERY_LOGIN_REFUSED = (
    "password login failed: unknown user, no password set, wrong password, or a missing "
    "or wrong second-factor code"
)
MAX_CODE_CHARS = 64  # generous for a 6-digit code or a 19-character recovery code


@dataclass(frozen=True)
class FactorLimits:
    """Wrong codes per account in a window (TOTP has a million codes, three valid at a
    time); the password budget per account and its window."""

    code_failures_per_account: int = 10
    code_failure_window: float = 900.0
    password_budget: int = 10
    password_budget_window: float = 86400.0


@dataclass(frozen=True)
class TotpEnrollment:
    secret: str
    uri: str
    digits: int
    period_seconds: int


@dataclass(frozen=True)
class FactorSummary:
    second_factor_enabled: bool
    recovery_codes_remaining: int
    password_set: bool


def _one_of(code: str, recovery_code: str, what: str) -> None:
    if bool(code) == bool(recovery_code):
        raise InvalidArgument(f"{what}: send exactly one of code and recovery_code")
    if len(code) > MAX_CODE_CHARS or len(recovery_code) > MAX_CODE_CHARS:
        raise InvalidArgument(f"codes are at most {MAX_CODE_CHARS} characters")


class Factors:
    """The factor use cases. Callers are already authenticated (public RPCs) or are the
    session service (checks)."""

    def __init__(
        self,
        store: FactorStore,
        users: IdentityStore,
        hasher: PasswordHasher,
        audit: AuditSink,
        clock: Callable[[], float] = time.time,
        limits: FactorLimits | None = None,
        windows: CounterFactory | None = None,
    ) -> None:
        self._store = store
        self._users = users
        self._hasher = hasher
        self._audit = audit
        self._clock = clock
        self._limits = limits or FactorLimits()
        # In this process's memory unless the wiring shares them between replicas.
        windows = windows or local_counters(clock)
        self._code_failures = windows(
            "code-failures",
            self._limits.code_failures_per_account,
            self._limits.code_failure_window,
        )
        # Unknown user ids have no row to count in; their budget lives here.
        self._unknown_budget = windows(
            "unknown-password-budget",
            self._limits.password_budget,
            self._limits.password_budget_window,
        )

    def _state(self, user_id: str) -> FactorState:
        state = self._store.get(user_id)
        if state is None:
            raise NoSuchUser
        return state

    def summary(self, user_id: str) -> FactorSummary:
        state = self._state(user_id)
        return FactorSummary(
            second_factor_enabled=state.totp_enabled,
            recovery_codes_remaining=state.recovery_codes,
            password_set=state.password_hash is not None,
        )

    def second_factor_enabled(self, user_id: str) -> bool:
        state = self._store.get(user_id)
        return state is not None and state.totp_enabled

    # --- TOTP -------------------------------------------------------------------------

    def begin_totp(self, user_id: str) -> TotpEnrollment:
        if self._state(user_id).totp_enabled:
            raise FailedPrecondition(
                "a TOTP second factor is already active; remove it first (RemoveTotp)"
            )
        secret = totp.new_secret()
        self._store.set_pending_totp(
            user_id, secret, AuditRecord(audit_events.TOTP_ENROLLMENT_STARTED, user_id)
        )
        return TotpEnrollment(
            secret, totp.provisioning_uri(secret, user_id), totp.DIGITS, totp.PERIOD_SECONDS
        )

    def activate_totp(self, user_id: str, code: str) -> list[str]:
        """Activates the pending secret with a first valid code; returns new recovery
        codes (shown once)."""
        _one_of(code, "", "ActivateTotp")
        self._check_code_budget(user_id)
        state = self._state(user_id)
        if state.totp_pending is None:
            raise FailedPrecondition(
                "no TOTP enrolment is pending; start one with BeginTotpEnrollment"
            )
        step = totp.matching_step(state.totp_pending, code, self._clock())
        codes = recovery_codes.generate()
        if step is None or not self._store.activate_totp(
            user_id,
            state.totp_pending,
            step,
            [recovery_codes.normalize(c) or "" for c in codes],
            AuditRecord(audit_events.TOTP_ENABLED, user_id, {"recovery_codes": str(len(codes))}),
        ):
            self._code_failed(user_id, TOTP, "activation")
        return codes

    def remove_totp(self, user_id: str, code: str, recovery_code: str) -> None:
        if not self._state(user_id).totp_enabled:
            raise FailedPrecondition("this account has no TOTP second factor")
        used = self.verify_second_factor(user_id, code, recovery_code, purpose="removal")
        self._store.remove_totp(
            user_id, AuditRecord(audit_events.TOTP_REMOVED, user_id, {"with": used})
        )

    # --- recovery codes ---------------------------------------------------------------

    def regenerate_recovery_codes(self, user_id: str) -> list[str]:
        codes = recovery_codes.generate()
        self._store.replace_recovery_codes(
            user_id,
            [recovery_codes.normalize(c) or "" for c in codes],
            AuditRecord(audit_events.RECOVERY_CODES_GENERATED, user_id, {"count": str(len(codes))}),
        )
        return codes

    def _use_recovery_code(self, user_id: str, code: str, purpose: str) -> bool:
        normal = recovery_codes.normalize(code)
        return normal is not None and self._store.use_recovery_code(
            user_id,
            normal,
            AuditRecord(audit_events.RECOVERY_CODE_USED, user_id, {"purpose": purpose}),
        )

    # --- step-up checks -----------------------------------------------------------------

    def _check_code_budget(self, user_id: str) -> None:
        wait = self._code_failures.retry_after(user_id)
        if wait is not None:
            raise ResourceExhausted("too many wrong codes for this account", retry_after=wait)

    def _code_failed(self, user_id: str, factor: str, purpose: str) -> None:
        self._code_failures.hit(user_id)
        self._audit.record(
            AuditRecord(
                audit_events.SECOND_FACTOR_FAILED,
                user_id,
                {"factor": factor, "purpose": purpose},
            )
        )
        raise Unauthenticated(CODE_REFUSED)

    def _accept_totp(self, user_id: str, state: FactorState, code: str) -> bool:
        assert state.totp_secret is not None
        step = totp.matching_step(state.totp_secret, code, self._clock())
        # The step must be later than the last accepted one; the store decides that
        # atomically, so two concurrent calls with one code cannot both pass.
        return step is not None and self._store.accept_totp_step(user_id, step)

    def verify_second_factor(
        self, user_id: str, code: str, recovery_code: str, *, purpose: str = "step_up"
    ) -> str:
        """Checks a TOTP code (accepted once) or uses up a recovery code; returns which.
        Raises Unauthenticated, FailedPrecondition, InvalidArgument, ResourceExhausted."""
        validation.user_id(user_id)
        _one_of(code, recovery_code, "a second factor")
        self._check_code_budget(user_id)
        state = self._store.get(user_id)
        if state is None:
            raise Unauthenticated(CODE_REFUSED)
        if code:
            if not state.totp_enabled:
                raise FailedPrecondition(
                    "this account has no TOTP second factor; step up with a recovery code "
                    "or a device-key signature"
                )
            if not self._accept_totp(user_id, state, code):
                self._code_failed(user_id, TOTP, purpose)
            used = TOTP
        else:
            if not self._use_recovery_code(user_id, recovery_code, purpose):
                self._code_failed(user_id, RECOVERY_CODE, purpose)
            used = RECOVERY_CODE
            # Whoever holds a recovery code may also refill the password budget.
            self._store.reset_password_budget(user_id)
        self._code_failures.reset(user_id)
        return used

    # --- password -----------------------------------------------------------------------

    def set_password(self, user_id: str, password: str) -> None:
        user = self._users.get_user(user_id)
        if user is None or not user.active:
            raise NoSuchUser
        state = self._state(user_id)
        normal = passwords.check_new_password(password, user_id, user.alias)
        self._store.set_password(
            user_id,
            self._hasher.hash(normal),
            AuditRecord(
                audit_events.PASSWORD_SET,
                user_id,
                {"change": "changed" if state.password_hash else "set"},
            ),
        )

    def refill_password_budget(self, user_id: str) -> None:
        """A device-key login proves the owner is around: their budget is whole again."""
        self._store.reset_password_budget(user_id)

    def verify_password(self, user_id: str, password: str, code: str, recovery_code: str) -> str:
        """Checks a password login; returns the second factor proven with it.

        Every failure is the same Unauthenticated after the same work: the attempt is
        counted (one database write, also for unknown ids) before the Argon2id check,
        which runs against a decoy hash when there is no real one, and a wrong code is
        never recorded apart from the failed login (that would tell the password was
        right). Counting first means concurrent guesses cannot overrun the budget.
        """
        validation.user_id(user_id)
        if not password or len(password) > passwords.MAX_CHARS:
            raise InvalidArgument(f"password must be 1 to {passwords.MAX_CHARS} characters")
        if code and recovery_code:
            raise InvalidArgument("send at most one of second_factor_code and recovery_code")
        if len(code) > MAX_CODE_CHARS or len(recovery_code) > MAX_CODE_CHARS:
            raise InvalidArgument(f"codes are at most {MAX_CODE_CHARS} characters")
        now = self._clock()
        limits = self._limits
        state = self._store.get(user_id)
        count = self._store.record_password_failure(user_id, now, limits.password_budget_window)
        budget_used_code = False
        if count is None or state is None:
            wait = self._unknown_budget.acquire(user_id)
            state = None
        elif count > limits.password_budget:
            start = state.password_window_start or now
            wait = max(start + limits.password_budget_window - now, 1.0)
            if recovery_code and self._use_recovery_code(user_id, recovery_code, "budget_reset"):
                self._store.reset_password_budget(user_id)
                budget_used_code, wait = True, None
        else:
            wait = None
        if wait is not None:
            raise ResourceExhausted(
                "too many failed password logins for this account; log in with your device "
                "key, or send a recovery code with the password, to reset the count",
                retry_after=wait,
            )

        stored = state.password_hash if state is not None else None
        right = self._hasher.verify(stored or self._hasher.decoy, password)
        if not (right and state is not None and stored is not None):
            raise Unauthenticated(RECOVERY_LOGIN_REFUSED)
        used = self._second_factor_with_password(
            user_id, state, code, recovery_code, budget_used_code
        )
        self._store.reset_password_budget(user_id)
        if self._hasher.needs_rehash(stored):
            self._store.rehash_password(
                user_id,
                stored,
                self._hasher.hash(passwords.normalize(password)),
                AuditRecord(audit_events.PASSWORD_REHASHED, user_id),
            )
        return used

    def _second_factor_with_password(
        self,
        user_id: str,
        state: FactorState,
        code: str,
        recovery_code: str,
        budget_used_code: bool,
    ) -> str:
        if budget_used_code:
            return RECOVERY_CODE
        if recovery_code:
            if self._use_recovery_code(user_id, recovery_code, "password_login"):
                return RECOVERY_CODE
            raise Unauthenticated(RECOVERY_LOGIN_REFUSED)
        if state.totp_enabled:
            if code and self._accept_totp(user_id, state, code):
                return TOTP
            raise Unauthenticated(RECOVERY_LOGIN_REFUSED)
        if code:  # a code for an account that has no TOTP factor
            raise Unauthenticated(RECOVERY_LOGIN_REFUSED)
        return NONE
