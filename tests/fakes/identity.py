"""Fakes of what the identity domain talks to: its store and the session service."""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass

from services.common.audit_events import AuditRecord
from services.identity.keys import OneTimePrekey, SignedKey
from services.identity.model import (
    NO_FACTORS,
    FactorState,
    IdentityCounts,
    NewKeys,
    NewUser,
    NoSuchUser,
    PendingRevocation,
    PoolFull,
    PrekeyIdsInUse,
    User,
    UserIdTaken,
)


class RecordingRevoker:
    """`SessionRevoker` that remembers whose sessions it was asked to revoke; set
    `failure` to make the session service unreachable."""

    def __init__(self) -> None:
        self.revoked: list[str] = []
        self.kept: list[str] = []  # the session each revocation spared ("" for none)
        self.failure: Exception | None = None

    async def revoke_all(self, user_id: str, *, keep_session_id: str = "") -> int:
        if self.failure is not None:
            raise self.failure
        self.revoked.append(user_id)
        self.kept.append(keep_session_id)
        return 0


@dataclass
class _Row:
    user: User
    prekeys: dict[int, OneTimePrekey]


class MemoryIdentityStore:
    """`IdentityStore` in a dict, for fast domain tests. `events` are the audit records
    that would have gone into the outbox with each change."""

    def __init__(self, events: list[AuditRecord] | None = None) -> None:
        self._users: dict[str, _Row] = {}
        self._lock = threading.Lock()  # the domain calls stores from worker threads
        self.events = events if events is not None else []
        self._revocations: dict[int, str] = {}
        self._next_revocation = 1

    def add_user(self, user: NewUser, audit: AuditRecord) -> None:
        with self._lock:
            if user.user_id in self._users:
                raise UserIdTaken
            stored = User(
                user_id=user.user_id,
                alias=user.alias,
                metadata=dict(user.metadata),
                identity_key=user.identity_key,
                verify_key=user.verify_key,
                signed_prekey=user.signed_prekey,
                pq_prekey=user.pq_prekey,
                create_time=user.create_time,
                last_login_time=None,
                deactivate_time=None,
                one_time_prekey_count=0,
            )
            self._users[user.user_id] = _Row(stored, {k.key_id: k for k in user.one_time_prekeys})
            self.events.append(audit)

    def get_user(self, user_id: str) -> User | None:
        with self._lock:
            row = self._users.get(user_id)
            if row is None:
                return None
            return dataclasses.replace(row.user, one_time_prekey_count=len(row.prekeys))

    def get_verify_key(self, user_id: str) -> bytes | None:
        with self._lock:
            row = self._users.get(user_id)
            return row.user.verify_key if row and row.user.active else None

    def is_active(self, user_id: str) -> bool | None:
        with self._lock:
            row = self._users.get(user_id)
            return None if row is None else row.user.active

    def _active(self, user_id: str) -> _Row:
        row = self._users.get(user_id)
        if row is None or not row.user.active:
            raise NoSuchUser
        return row

    def take_one_time_prekey(self, user_id: str) -> OneTimePrekey | None:
        with self._lock:
            row = self._active(user_id)
            return row.prekeys.pop(min(row.prekeys)) if row.prekeys else None

    def add_one_time_prekeys(
        self, user_id: str, keys: list[OneTimePrekey], cap: int, audit: AuditRecord
    ) -> int:
        with self._lock:
            row = self._active(user_id)
            if len(row.prekeys) + len(keys) > cap:
                raise PoolFull(len(row.prekeys), cap)
            if any(k.key_id in row.prekeys for k in keys):
                raise PrekeyIdsInUse
            row.prekeys.update({k.key_id: k for k in keys})
            self.events.append(audit)
            return len(row.prekeys)

    def set_prekeys(
        self, user_id: str, signed: SignedKey, pq: SignedKey | None, audit: AuditRecord
    ) -> None:
        with self._lock:
            row = self._active(user_id)
            row.user = dataclasses.replace(
                row.user, signed_prekey=signed, pq_prekey=pq or row.user.pq_prekey
            )
            self.events.append(audit)

    def record_login(self, user_id: str, when: float) -> None:
        with self._lock:
            row = self._active(user_id)
            last = max(row.user.last_login_time or 0.0, when)
            row.user = dataclasses.replace(row.user, last_login_time=last)

    def deactivate(self, user_id: str, when: float, audit: AuditRecord) -> float:
        with self._lock:
            row = self._users.get(user_id)
            if row is None:
                raise NoSuchUser(active=False)
            if row.user.deactivate_time is not None:
                return row.user.deactivate_time
            row.user = dataclasses.replace(row.user, deactivate_time=when)
            row.prekeys.clear()
            self.events.append(audit)
            self._revocations[self._next_revocation] = user_id
            self._next_revocation += 1
            return when

    def pending_revocations(self, limit: int) -> list[PendingRevocation]:
        with self._lock:
            items = sorted(self._revocations.items())[:limit]
            return [PendingRevocation(number, user_id) for number, user_id in items]

    def revocation_done(self, revocation_id: int) -> None:
        with self._lock:
            self._revocations.pop(revocation_id, None)

    def replace_keys(self, user_id: str, keys: NewKeys, audit: AuditRecord) -> int:
        with self._lock:
            row = self._active(user_id)
            if len({k.key_id for k in keys.one_time_prekeys}) != len(keys.one_time_prekeys):
                raise PrekeyIdsInUse
            discarded = len(row.prekeys)
            row.user = dataclasses.replace(
                row.user,
                identity_key=keys.identity_key,
                verify_key=keys.verify_key,
                signed_prekey=keys.signed_prekey,
                pq_prekey=keys.pq_prekey,
            )
            row.prekeys = {k.key_id: k for k in keys.one_time_prekeys}
            self.events.append(audit)
            return discarded

    def counts(self) -> IdentityCounts:
        with self._lock:
            rows = list(self._users.values())
        active = [r for r in rows if r.user.active]
        return IdentityCounts(
            registered=len(rows),
            active=len(active),
            deactivated=len(rows) - len(active),
            one_time_prekeys=sum(len(r.prekeys) for r in rows),
            active_without_prekeys=sum(1 for r in active if not r.prekeys),
        )


class MemoryFactorStore:
    """`FactorStore` in memory beside a `MemoryIdentityStore` (whose users it checks),
    held to the same contract suite as SQLite (tests/unit/test_store_contract_factors.py).
    Events go to `events`, as the SQLite store's outbox would keep them; recovery codes
    are kept as given (the fake has no thief to fear)."""

    def __init__(
        self, users: MemoryIdentityStore | None = None, events: list[AuditRecord] | None = None
    ) -> None:
        self.users = users or MemoryIdentityStore()
        self.events = events if events is not None else self.users.events
        self._state: dict[str, FactorState] = {}
        self._codes: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def _user(self, user_id: str) -> FactorState:
        if not self.users.is_active(user_id):
            # A deactivated account keeps no secrets.
            self._state.pop(user_id, None)
            self._codes.pop(user_id, None)
            raise NoSuchUser
        return self._state.get(user_id, NO_FACTORS)

    def _put(self, user_id: str, state: FactorState, audit: AuditRecord | None = None) -> None:
        self._state[user_id] = state
        if audit is not None:
            self.events.append(audit)

    def get(self, user_id: str) -> FactorState | None:
        with self._lock:
            try:
                state = self._user(user_id)
            except NoSuchUser:
                return None
            codes = len(self._codes.get(user_id, set()))
            return dataclasses.replace(state, recovery_codes=codes)

    def set_pending_totp(self, user_id: str, secret: str, audit: AuditRecord) -> None:
        with self._lock:
            state = self._user(user_id)
            self._put(user_id, dataclasses.replace(state, totp_pending=secret), audit)

    def activate_totp(
        self, user_id: str, pending: str, step: int, codes: list[str], audit: AuditRecord
    ) -> bool:
        with self._lock:
            state = self._user(user_id)
            if state.totp_pending != pending:
                return False
            new = dataclasses.replace(
                state, totp_secret=pending, totp_pending=None, totp_last_step=step
            )
            self._codes[user_id] = set(codes)
            self._put(user_id, new, audit)
            return True

    def accept_totp_step(self, user_id: str, step: int) -> bool:
        with self._lock:
            state = self._user(user_id)
            if state.totp_secret is None or state.totp_last_step >= step:
                return False
            self._put(user_id, dataclasses.replace(state, totp_last_step=step))
            return True

    def remove_totp(self, user_id: str, audit: AuditRecord) -> bool:
        with self._lock:
            state = self._user(user_id)
            if state.totp_secret is None:
                return False
            removed = dataclasses.replace(state, totp_secret=None, totp_pending=None)
            self._put(user_id, removed, audit)
            return True

    def replace_recovery_codes(self, user_id: str, codes: list[str], audit: AuditRecord) -> None:
        with self._lock:
            self._put(user_id, self._user(user_id), audit)
            self._codes[user_id] = set(codes)

    def use_recovery_code(self, user_id: str, code: str, audit: AuditRecord) -> bool:
        with self._lock:
            self._user(user_id)
            codes = self._codes.get(user_id, set())
            if code not in codes:
                return False
            codes.remove(code)
            self.events.append(audit)
            return True

    def set_password(self, user_id: str, password_hash: str, audit: AuditRecord) -> None:
        with self._lock:
            state = dataclasses.replace(
                self._user(user_id),
                password_hash=password_hash,
                password_failures=0,
                password_window_start=None,
            )
            self._put(user_id, state, audit)

    def rehash_password(
        self, user_id: str, old_hash: str, new_hash: str, audit: AuditRecord
    ) -> bool:
        with self._lock:
            state = self._user(user_id)
            if state.password_hash != old_hash:
                return False
            self._put(user_id, dataclasses.replace(state, password_hash=new_hash), audit)
            return True

    def record_password_failure(self, user_id: str, now: float, window: float) -> int | None:
        with self._lock:
            try:
                state = self._user(user_id)
            except NoSuchUser:
                return None
            start = state.password_window_start
            if start is None or start <= now - window:
                state = dataclasses.replace(state, password_failures=1, password_window_start=now)
            else:
                state = dataclasses.replace(state, password_failures=state.password_failures + 1)
            self._put(user_id, state)
            return state.password_failures

    def reset_password_budget(self, user_id: str) -> None:
        with self._lock:
            state = dataclasses.replace(
                self._user(user_id), password_failures=0, password_window_start=None
            )
            self._put(user_id, state)
