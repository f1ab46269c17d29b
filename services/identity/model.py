"""What identity's rules, storage and transport share: its types, its store protocol, its
errors. Domain, stores and servicer import from here; this module imports none of them.

"Not found" is said one way: lookups return None, commands raise `NoSuchUser`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from services.common.audit_events import AuditRecord
from services.common.errors import AlreadyExists, NotFound, ResourceExhausted
from services.identity.keys import OneTimePrekey, SignedKey


@dataclass(frozen=True)
class NewUser:
    user_id: str
    alias: str
    metadata: dict[str, str]
    identity_key: bytes
    verify_key: bytes
    signed_prekey: SignedKey
    pq_prekey: SignedKey
    one_time_prekeys: list[OneTimePrekey]
    create_time: float


@dataclass(frozen=True)
class User:
    user_id: str
    alias: str
    metadata: dict[str, str]
    identity_key: bytes
    verify_key: bytes
    signed_prekey: SignedKey
    pq_prekey: SignedKey
    create_time: float
    last_login_time: float | None
    deactivate_time: float | None
    one_time_prekey_count: int

    @property
    def active(self) -> bool:
        return self.deactivate_time is None


@dataclass(frozen=True)
class IdentityCounts:
    registered: int
    active: int
    deactivated: int
    one_time_prekeys: int
    active_without_prekeys: int


@dataclass(frozen=True)
class NewKeys:
    """A complete replacement of a user's long-term keys (after a lost device)."""

    identity_key: bytes
    verify_key: bytes
    signed_prekey: SignedKey
    pq_prekey: SignedKey
    one_time_prekeys: list[OneTimePrekey]


@dataclass(frozen=True)
class FactorState:
    """An active user's authentication factors, decrypted (never leaves identity)."""

    totp_secret: str | None  # the active TOTP secret
    totp_pending: str | None  # an enrolment waiting for its first code
    totp_last_step: int  # the last accepted time step; codes of earlier steps are refused
    password_hash: str | None  # Argon2id PHC string
    password_failures: int  # failed password logins in the current budget window
    password_window_start: float | None  # when that window began
    recovery_codes: int  # unused recovery codes

    @property
    def totp_enabled(self) -> bool:
        return self.totp_secret is not None


NO_FACTORS = FactorState(None, None, 0, None, 0, None, 0)


class NoSuchUser(NotFound):
    """A command named a user that does not exist (or, unless `active=False`, is
    deactivated)."""

    def __init__(self, *, active: bool = True) -> None:
        super().__init__(f"no {'active ' if active else ''}user with that user id")


class UserIdTaken(AlreadyExists):
    def __init__(self) -> None:
        super().__init__("that user id is already taken")


class PrekeyIdsInUse(AlreadyExists):
    def __init__(self) -> None:
        super().__init__(
            "a one-time prekey with one of these key ids is already in the pool; use fresh key ids"
        )


class PoolFull(ResourceExhausted):
    """Adding the keys would grow a user's one-time prekey pool past its cap."""

    def __init__(self, current: int, cap: int) -> None:
        super().__init__(
            f"the one-time prekey pool holds {current} keys and may hold at most {cap}; "
            f"upload at most {cap - current} more"
        )
        self.current = current


class IdentityStore(Protocol):
    """What the identity rules need from storage. Every implementation (SQLite
    today, others later) must pass tests/unit/test_store_contract_identity.py.

    Every change that takes an `AuditRecord` stores it in the same transaction.
    """

    def add_user(self, user: NewUser, audit: AuditRecord) -> None:
        """Raises UserIdTaken."""
        ...

    def get_user(self, user_id: str) -> User | None:
        """Any user, active or deactivated."""
        ...

    def get_verify_key(self, user_id: str) -> bytes | None:
        """An active user's verify key."""
        ...

    def is_active(self, user_id: str) -> bool | None:
        """None for an unknown user."""
        ...

    def take_one_time_prekey(self, user_id: str) -> OneTimePrekey | None:
        """Removes and returns the active user's lowest-numbered one-time prekey, None when
        the pool is empty; two callers never get the same key. Raises NoSuchUser."""
        ...

    def add_one_time_prekeys(
        self, user_id: str, keys: list[OneTimePrekey], cap: int, audit: AuditRecord
    ) -> int:
        """Returns the pool's new size. Raises NoSuchUser, PoolFull, PrekeyIdsInUse."""
        ...

    def set_prekeys(
        self, user_id: str, signed: SignedKey, pq: SignedKey | None, audit: AuditRecord
    ) -> None:
        """Replaces the signed prekey (and the PQ prekey unless None). Raises NoSuchUser."""
        ...

    def record_login(self, user_id: str, when: float) -> None:
        """Moves the last login time forward (never back). Raises NoSuchUser."""
        ...

    def deactivate(self, user_id: str, when: float, audit: AuditRecord) -> float:
        """Deactivates and empties the prekey pool, and records in the same transaction
        that the user's sessions must be revoked (see `pending_revocations`); returns the
        deactivation time (the first one if already deactivated, with no new audit event).
        Raises NoSuchUser(active=False)."""
        ...

    def pending_revocations(self, limit: int) -> list[PendingRevocation]:
        """Deactivated users whose sessions have not been revoked yet, oldest first."""
        ...

    def revocation_done(self, revocation_id: int) -> None:
        """Forgets a pending revocation once the session service has done it."""
        ...

    def replace_keys(self, user_id: str, keys: NewKeys, audit: AuditRecord) -> int:
        """Replaces the active user's long-term keys and one-time prekey pool; returns how
        many old one-time prekeys were discarded. Raises NoSuchUser, PrekeyIdsInUse
        (never, since the pool is emptied first, but the store checks)."""
        ...

    def counts(self) -> IdentityCounts: ...


class FactorStore(Protocol):
    """Where identity keeps authentication factors (same database as the users).

    Secrets (TOTP secrets, password hashes) are stored encrypted; recovery codes only
    as keyed hashes, so the store takes codes as typed (normalised) and never returns
    them. Every method that names a user raises NoSuchUser unless the user is active,
    except `get` (None). Changes that take an `AuditRecord` store it in the same
    transaction, and only when they change something.
    """

    def get(self, user_id: str) -> FactorState | None:
        """The active user's factors (NO_FACTORS if none were ever set), or None."""
        ...

    def set_pending_totp(self, user_id: str, secret: str, audit: AuditRecord) -> None:
        """Stores an enrolment waiting for its first code, replacing any earlier one."""
        ...

    def activate_totp(
        self, user_id: str, pending: str, step: int, codes: list[str], audit: AuditRecord
    ) -> bool:
        """Makes the pending secret, if it is still `pending`, the active one with `step`
        as its last accepted step, and replaces the recovery codes with `codes`.
        False (nothing changed) if the enrolment was activated or replaced meanwhile."""
        ...

    def accept_totp_step(self, user_id: str, step: int) -> bool:
        """Records `step` as the last accepted one if it is later than the stored one and
        a TOTP factor is active: True exactly once per step, even under concurrent calls."""
        ...

    def remove_totp(self, user_id: str, audit: AuditRecord) -> bool:
        """Removes the TOTP factor (active and pending); False if there was none."""
        ...

    def replace_recovery_codes(self, user_id: str, codes: list[str], audit: AuditRecord) -> None:
        """Replaces every recovery code of the user with `codes` (normalised)."""
        ...

    def use_recovery_code(self, user_id: str, code: str, audit: AuditRecord) -> bool:
        """Removes `code` (normalised) if it is one of the user's: True exactly once."""
        ...

    def set_password(self, user_id: str, password_hash: str, audit: AuditRecord) -> None:
        """Stores a new password hash and clears the password budget."""
        ...

    def rehash_password(
        self, user_id: str, old_hash: str, new_hash: str, audit: AuditRecord
    ) -> bool:
        """Replaces the hash if it is still `old_hash` (upgraded parameters)."""
        ...

    def record_password_failure(self, user_id: str, now: float, window: float) -> int | None:
        """Counts a password attempt in the budget window (a new window starts when the
        last began `window` seconds or more before `now`); returns the count, or None for
        an unknown or deactivated user after a write of the same cost (so timing does not
        tell them apart)."""
        ...

    def reset_password_budget(self, user_id: str) -> None:
        """Clears the failure count (a device-key login, a recovery code, a success)."""
        ...


@dataclass(frozen=True)
class PendingRevocation:
    revocation_id: int
    user_id: str


class SessionRevoker(Protocol):
    """The session service as deactivation and key replacement see it."""

    async def revoke_all(self, user_id: str, *, keep_session_id: str = "") -> int: ...
