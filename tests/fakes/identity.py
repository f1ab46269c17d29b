"""Fakes of what the identity domain talks to: its store and the session service."""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass

from services.common.audit_events import AuditRecord
from services.identity.keys import OneTimePrekey, SignedKey
from services.identity.model import (
    IdentityCounts,
    NewUser,
    NoSuchUser,
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
        self.failure: Exception | None = None

    async def revoke_all(self, user_id: str) -> int:
        if self.failure is not None:
            raise self.failure
        self.revoked.append(user_id)
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
            return when

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
