"""A bounded, per-process cache of decrypted session rows in front of a session store.

ValidateSession is the hottest call in the system (every authenticated call elsewhere
asks it, up to the callers' token caches). A hit answers from memory on the event loop:
no thread hop, no query, no decryption. Only the embedded default may use it: there one
process owns the database file (it is locked), so every change to a session passes
through this wrapper and empties the entry before it is acknowledged. Replicas sharing
PostgreSQL change rows behind each other's backs and must not use it.

What a hit can never do:
- serve a session that was revoked, deleted or logged out: those changes invalidate it
  once committed, before they return;
- serve a session past its deadlines: the record carries them and every hit is checked
  against the clock as a read from the store would be (and the domain checks the
  absolute lifetime on every call);
- serve a stale scope or step-up: set_assurance invalidates;
- be filled with a row read before a change that committed while the read was in flight
  (the change bumps an epoch; a fill from an older epoch is dropped).
Rows reach the cache only through the store's own read, so its checks (decryption with
associated data, and row MACs where the store has them) have passed for every entry.

Entries are decrypted user ids, addresses and user agents: memory only, never written;
bounded by `max_entries` (least recently used go first).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from services.common.audit_events import AuditRecord
from services.session.model import Assurance, CountedEvent, SessionRecord, SessionStore

DEFAULT_MAX_ENTRIES = 10_000


class CachedSessionStore:
    """`SessionStore` with a cache of live sessions by token hash (see module doc)."""

    def __init__(self, store: SessionStore, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._store = store
        self._max = max_entries
        self._lock = threading.Lock()  # the event loop and worker threads both use it
        self._by_token: OrderedDict[bytes, SessionRecord] = OrderedDict()
        self._token_of: dict[str, bytes] = {}  # session id -> token hash
        self._sessions_of: dict[str, set[str]] = {}  # user id -> session ids cached
        self._epoch = 0  # bumped by every change; fills from an older epoch are dropped

    # Reads

    def peek(self, token_hash: bytes, now: float) -> SessionRecord | None:
        """The cached session with that token hash unless it expired by `now`; never
        does I/O (None: ask `by_token`)."""
        with self._lock:
            record = self._by_token.get(token_hash)
            if record is None:
                return None
            if record.expire_time <= now:
                self._forget(record.session_id)
                return None
            self._by_token.move_to_end(token_hash)
            return record

    def by_token(self, token_hash: bytes, now: float) -> SessionRecord | None:
        with self._lock:
            epoch = self._epoch
        record = self._store.by_token(token_hash, now)
        if record is not None:
            self._fill(token_hash, record, epoch)
        return record

    def for_user(self, user_id: str, now: float) -> list[SessionRecord]:
        return self._store.for_user(user_id, now)

    def counts(self, now: float) -> tuple[int, int]:
        return self._store.counts(now)

    # Changes: each empties what it may have changed, after the store has committed it.

    def add(self, record: SessionRecord, token_hash: bytes, audit: AuditRecord) -> None:
        try:
            self._store.add(record, token_hash, audit)
        finally:
            self._invalidate(record.session_id)

    def set_expiry(self, session_id: str, expire_time: float) -> None:
        try:
            self._store.set_expiry(session_id, expire_time)
        finally:
            self._invalidate(session_id)

    def set_assurance(self, session_id: str, assurance: Assurance, audit: AuditRecord) -> None:
        try:
            self._store.set_assurance(session_id, assurance, audit)
        finally:
            self._invalidate(session_id)

    def delete(self, user_id: str, session_id: str, audit: AuditRecord) -> None:
        try:
            self._store.delete(user_id, session_id, audit)
        finally:
            self._invalidate(session_id)

    def delete_user(
        self, user_id: str, audit: CountedEvent, *, keep_session_id: str | None = None
    ) -> int:
        try:
            return self._store.delete_user(user_id, audit, keep_session_id=keep_session_id)
        finally:
            with self._lock:
                self._epoch += 1
                for session_id in list(self._sessions_of.get(user_id, ())):
                    if session_id != keep_session_id:
                        self._forget(session_id)

    def delete_expired(self, now: float) -> int:
        try:
            return self._store.delete_expired(now)
        finally:
            with self._lock:
                self._epoch += 1
                for record in list(self._by_token.values()):
                    if record.expire_time <= now:
                        self._forget(record.session_id)

    # Bookkeeping (callers hold the lock where it says so)

    def _fill(self, token_hash: bytes, record: SessionRecord, epoch: int) -> None:
        with self._lock:
            if epoch != self._epoch:
                return  # something changed while the row was read: it may be stale
            self._forget(record.session_id)
            self._by_token[token_hash] = record
            self._token_of[record.session_id] = token_hash
            self._sessions_of.setdefault(record.user_id, set()).add(record.session_id)
            while len(self._by_token) > self._max:
                _, oldest = self._by_token.popitem(last=False)
                self._unlink(oldest)

    def _invalidate(self, session_id: str) -> None:
        with self._lock:
            self._epoch += 1
            self._forget(session_id)

    def _forget(self, session_id: str) -> None:
        """Drops a session's entry (lock held)."""
        token_hash = self._token_of.get(session_id)
        if token_hash is None:
            return
        record = self._by_token.pop(token_hash, None)
        if record is not None:
            self._unlink(record)
        else:
            del self._token_of[session_id]

    def _unlink(self, record: SessionRecord) -> None:
        """Removes a dropped entry from the indexes (lock held)."""
        self._token_of.pop(record.session_id, None)
        sessions = self._sessions_of.get(record.user_id)
        if sessions is not None:
            sessions.discard(record.session_id)
            if not sessions:
                del self._sessions_of[record.user_id]

    def __len__(self) -> int:
        return len(self._by_token)
