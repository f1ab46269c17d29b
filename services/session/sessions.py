"""Session lifecycle rules: tokens, idle and absolute expiry, revocation."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.common import audit_events, validation
from services.common.audit_events import AuditRecord
from services.common.errors import InvalidArgument, NotFound, Unauthenticated
from services.session.store import SessionRecord, SessionStore

TOKEN_BYTES = 32
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{43}")
MAX_USER_AGENT_CHARS = 256

_REFUSED = "session token is invalid, expired or revoked; log in again"


@dataclass(frozen=True)
class SessionPolicy:
    idle_timeout: float = 1800.0
    max_lifetime: float = 12 * 3600.0

    @property
    def touch_granularity(self) -> float:
        # Sliding the deadline on every call would write on every authenticated RPC; moving
        # it only when it gains this much keeps the idle timeout exact to within it.
        return min(60.0, self.idle_timeout / 10)


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii")).digest()


def new_token() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(TOKEN_BYTES)).rstrip(b"=").decode()


class Sessions:
    def __init__(
        self,
        store: SessionStore,
        policy: SessionPolicy,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self.policy = policy
        self._clock = clock

    def create(self, user_id: str, ip_address: str, user_agent: str) -> tuple[str, SessionRecord]:
        """Creates a session; returns the token (shown once) and the record."""
        validation.text(user_agent, "user_agent", max_chars=MAX_USER_AGENT_CHARS, required=False)
        now = self._clock()
        deadline = now + self.policy.max_lifetime
        record = SessionRecord(
            session_id=secrets.token_hex(16),
            user_id=user_id,
            ip_address=ip_address,
            user_agent=user_agent,
            create_time=now,
            absolute_deadline=deadline,
            expire_time=min(now + self.policy.idle_timeout, deadline),
        )
        token = new_token()
        event = AuditRecord(
            audit_events.USER_LOGIN,
            user_id,
            {"session_id": record.session_id, "ip": ip_address},
            occur_time=now,
        )
        self._store.add(record, hash_token(token), event)
        return token, record

    def validate(self, token: str, *, strict_shape: bool = False) -> SessionRecord:
        """The live session of a token, its idle deadline slid forward.

        `strict_shape` makes a malformed token INVALID_ARGUMENT (internal callers);
        otherwise every bad token is the same UNAUTHENTICATED.
        """
        if not TOKEN_PATTERN.fullmatch(token):
            if strict_shape:
                raise InvalidArgument("token must be the 43-character string from CreateSession")
            raise Unauthenticated(_REFUSED)
        now = self._clock()
        record = self._store.by_token(hash_token(token), now)
        if record is None:
            raise Unauthenticated(_REFUSED)
        return self._slide(record, now)

    def _slide(self, record: SessionRecord, now: float, *, force: bool = False) -> SessionRecord:
        new_expiry = min(now + self.policy.idle_timeout, record.absolute_deadline)
        if not force and new_expiry - record.expire_time < self.policy.touch_granularity:
            return record
        self._store.set_expiry(record.session_id, new_expiry)
        return dataclasses.replace(record, expire_time=new_expiry)

    def touch(self, record: SessionRecord) -> SessionRecord:
        """An explicit touch always moves the deadline, whatever the granularity."""
        return self._slide(record, self._clock(), force=True)

    def list(self, user_id: str) -> list[SessionRecord]:
        return self._store.for_user(user_id, self._clock())

    def delete(self, caller: SessionRecord, session_id: str) -> None:
        target = session_id or caller.session_id
        event = AuditRecord(audit_events.USER_LOGOUT, caller.user_id, {"session_id": target})
        if not self._store.delete(caller.user_id, target, event):
            raise NotFound("no session of yours has that session_id")

    def revoke_others(self, caller: SessionRecord) -> int:
        return self._store.delete_user(
            caller.user_id,
            _revoked(caller.user_id, "others"),
            keep_session_id=caller.session_id,
        )

    def revoke_user(self, user_id: str) -> int:
        validation.user_id(user_id)
        return self._store.delete_user(user_id, _revoked(user_id, "all"))

    def cleanup(self) -> int:
        return self._store.delete_expired(self._clock())

    def counts(self) -> tuple[int, int]:
        return self._store.counts(self._clock())


def _revoked(user_id: str, scope: str) -> Callable[[int], AuditRecord | None]:
    def event(count: int) -> AuditRecord | None:
        if count == 0:
            return None
        details = {"count": str(count), "scope": scope}
        return AuditRecord(audit_events.SESSIONS_REVOKED, user_id, details)

    return event
