"""A bounded, per-process cache of decrypted account rows in front of an identity store.

Every key bundle fetch reads the target's account (one query, a row MAC, three
decryptions) before it takes a one-time prekey. The published keys change rarely, so
`published` answers from memory. Only the embedded default may use it: there one process
owns the database file (it is locked), so every change to an account passes through
this wrapper and empties the entry before it is acknowledged. Replicas sharing
PostgreSQL change rows behind each other's backs and must not use it.

What a hit can never do:
- serve keys that were replaced (ReplaceAccountKeys) or rotated (signed and PQ
  prekeys), or an account that was deactivated: those changes invalidate the entry once
  committed, before they return;
- be filled with a row read before such a change committed while the read was in flight
  (each change bumps an epoch; a fill from an older epoch is dropped);
- answer the login's verify-key lookup: that one must cost the same for unknown users as
  for known ones (see SqliteIdentityStore.get_verify_key), so it always reads the store.
Rows reach the cache only through the store's own read, so its checks (the row MAC,
decryption with associated data) have passed for every entry. The one-time prekey count
of a cached account is as read, not kept current (a fetch takes one): `published` is for
the keys and status; `get_user` always asks the store.

Entries hold decrypted user ids, aliases and metadata: memory only, never written;
bounded by `max_entries` (least recently used go first).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from services.common.audit_events import AuditRecord
from services.identity.keys import OneTimePrekey, SignedKey
from services.identity.model import (
    IdentityCounts,
    IdentityStore,
    NewKeys,
    NewUser,
    PendingRevocation,
    User,
)

DEFAULT_MAX_ENTRIES = 10_000


class CachedIdentityStore:
    """`IdentityStore`, plus `published` answered from memory (see module doc)."""

    def __init__(self, store: IdentityStore, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._store = store
        self._max = max_entries
        self._lock = threading.Lock()
        self._users: OrderedDict[str, User] = OrderedDict()
        self._epoch = 0  # bumped by every change; fills from an older epoch are dropped

    def published(self, user_id: str) -> User | None:
        """The account with its published keys, from memory if it was read before; its
        `one_time_prekey_count` is as read then, not current."""
        with self._lock:
            user = self._users.get(user_id)
            if user is not None:
                self._users.move_to_end(user_id)
                return user
        return self.get_user(user_id)

    # Reads

    def get_user(self, user_id: str) -> User | None:
        with self._lock:
            epoch = self._epoch
        user = self._store.get_user(user_id)
        if user is not None:
            self._fill(user_id, user, epoch)
        return user

    def get_verify_key(self, user_id: str) -> bytes | None:
        return self._store.get_verify_key(user_id)

    def is_active(self, user_id: str) -> bool | None:
        return self._store.is_active(user_id)

    def counts(self) -> IdentityCounts:
        return self._store.counts()

    # One-time prekeys: not cached, nothing to invalidate.

    def take_one_time_prekey(self, user_id: str) -> OneTimePrekey | None:
        return self._store.take_one_time_prekey(user_id)

    def add_one_time_prekeys(
        self, user_id: str, keys: list[OneTimePrekey], cap: int, audit: AuditRecord
    ) -> int:
        return self._store.add_one_time_prekeys(user_id, keys, cap, audit)

    # Changes to accounts: each empties the entry after the store has committed it.

    def add_user(self, user: NewUser, audit: AuditRecord) -> None:
        try:
            self._store.add_user(user, audit)
        finally:
            self._invalidate(user.user_id)

    def set_prekeys(
        self, user_id: str, signed: SignedKey, pq: SignedKey | None, audit: AuditRecord
    ) -> None:
        try:
            self._store.set_prekeys(user_id, signed, pq, audit)
        finally:
            self._invalidate(user_id)

    def record_login(self, user_id: str, when: float) -> None:
        try:
            self._store.record_login(user_id, when)
        finally:
            self._invalidate(user_id)

    def deactivate(self, user_id: str, when: float, audit: AuditRecord) -> float:
        try:
            return self._store.deactivate(user_id, when, audit)
        finally:
            self._invalidate(user_id)

    def pending_revocations(self, limit: int) -> list[PendingRevocation]:
        return self._store.pending_revocations(limit)

    def revocation_done(self, revocation_id: int) -> None:
        self._store.revocation_done(revocation_id)

    def replace_keys(self, user_id: str, keys: NewKeys, audit: AuditRecord) -> int:
        try:
            return self._store.replace_keys(user_id, keys, audit)
        finally:
            self._invalidate(user_id)

    # Bookkeeping

    def _fill(self, user_id: str, user: User, epoch: int) -> None:
        with self._lock:
            if epoch != self._epoch:
                return  # something changed while the row was read: it may be stale
            self._users[user_id] = user
            self._users.move_to_end(user_id)
            while len(self._users) > self._max:
                self._users.popitem(last=False)

    def _invalidate(self, user_id: str) -> None:
        with self._lock:
            self._epoch += 1
            self._users.pop(user_id, None)

    def __len__(self) -> int:
        return len(self._users)
