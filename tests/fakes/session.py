"""A fake of the session domain's store."""

from __future__ import annotations

import dataclasses
import threading

from services.common.audit_events import AuditRecord
from services.session.model import Assurance, CountedEvent, NoSuchSession, SessionRecord


class MemorySessionStore:
    """`SessionStore` in a dict, for fast domain tests. `events` are the audit records
    that would have gone into the outbox with each change."""

    def __init__(self, events: list[AuditRecord] | None = None) -> None:
        self._sessions: dict[str, tuple[SessionRecord, bytes]] = {}
        self._lock = threading.Lock()  # the domain calls stores from worker threads
        self.events = events if events is not None else []

    def add(self, record: SessionRecord, token_hash: bytes, audit: AuditRecord) -> None:
        with self._lock:
            self._sessions[record.session_id] = (record, token_hash)
            self.events.append(audit)

    def by_token(self, token_hash: bytes, now: float) -> SessionRecord | None:
        with self._lock:
            for record, stored_hash in self._sessions.values():
                if stored_hash == token_hash and record.expire_time > now:
                    return record
        return None

    def set_expiry(self, session_id: str, expire_time: float) -> None:
        with self._lock:
            if session_id not in self._sessions:
                raise NoSuchSession
            record, token_hash = self._sessions[session_id]
            self._sessions[session_id] = (
                dataclasses.replace(record, expire_time=expire_time),
                token_hash,
            )

    def set_assurance(self, session_id: str, assurance: Assurance, audit: AuditRecord) -> None:
        with self._lock:
            if session_id not in self._sessions:
                raise NoSuchSession
            record, token_hash = self._sessions[session_id]
            self._sessions[session_id] = (
                dataclasses.replace(record, assurance=assurance),
                token_hash,
            )
            self.events.append(audit)

    def for_user(self, user_id: str, now: float) -> list[SessionRecord]:
        with self._lock:
            mine = [
                record
                for record, _ in self._sessions.values()
                if record.user_id == user_id and record.expire_time > now
            ]
        return sorted(mine, key=lambda r: (r.create_time, r.session_id), reverse=True)

    def delete(self, user_id: str, session_id: str, audit: AuditRecord) -> None:
        with self._lock:
            found = self._sessions.get(session_id)
            if found is None or found[0].user_id != user_id:
                raise NoSuchSession
            del self._sessions[session_id]
            self.events.append(audit)

    def delete_user(
        self, user_id: str, audit: CountedEvent, *, keep_session_id: str | None = None
    ) -> int:
        with self._lock:
            doomed = [
                session_id
                for session_id, (record, _) in self._sessions.items()
                if record.user_id == user_id and session_id != keep_session_id
            ]
            for session_id in doomed:
                del self._sessions[session_id]
            event = audit(len(doomed))
            if event is not None:
                self.events.append(event)
            return len(doomed)

    def delete_expired(self, now: float) -> int:
        with self._lock:
            doomed = [s for s, (r, _) in self._sessions.items() if r.expire_time <= now]
            for session_id in doomed:
                del self._sessions[session_id]
            return len(doomed)

    def counts(self, now: float) -> tuple[int, int]:
        with self._lock:
            live = [r for r, _ in self._sessions.values() if r.expire_time > now]
        return len(live), len({r.user_id for r in live})
