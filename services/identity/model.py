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
        """Deactivates and empties the prekey pool; returns the deactivation time (the
        first one if already deactivated, with no new audit event).
        Raises NoSuchUser(active=False)."""
        ...

    def counts(self) -> IdentityCounts: ...


class SessionRevoker(Protocol):
    """The session service as deactivation sees it."""

    async def revoke_all(self, user_id: str) -> int: ...
