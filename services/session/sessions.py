"""Session lifecycle rules: tokens, idle and absolute expiry, listing, revocation."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from services.common import assurance, audit_events, validation
from services.common.audit_events import AuditRecord
from services.common.errors import InvalidArgument, PermissionDenied, Unauthenticated
from services.session.model import Assurance, NoSuchSession, SessionRecord, SessionStore

TOKEN_BYTES = 32
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{43}")
MAX_USER_AGENT_CHARS = 256
# ListSessions paging (AIP-158): a larger page_size is lowered to the maximum.
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

_REFUSED = "session token is invalid, expired or revoked; log in again"


@dataclass(frozen=True)
class SessionPolicy:
    idle_timeout: float = 1800.0
    max_lifetime: float = 12 * 3600.0
    # How long a step-up (or a login that met the account's requirement) lets a session
    # make sensitive calls.
    step_up_max_age: float = 600.0
    # A recovery session's whole life: enough to replace keys, short if a password leaks.
    recovery_lifetime: float = 900.0

    @property
    def touch_granularity(self) -> float:
        # Sliding the deadline on every call would write on every authenticated RPC; moving
        # it only when it gains this much keeps the idle timeout exact to within it.
        return min(60.0, self.idle_timeout / 10)


@dataclass(frozen=True)
class SessionPage:
    sessions: list[SessionRecord]
    next_page_token: str  # "" on the last page


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii")).digest()


def new_token() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(TOKEN_BYTES)).rstrip(b"=").decode()


class SessionMemo(Protocol):
    """Sessions already read, answered from memory (services.session.cache)."""

    def peek(self, token_hash: bytes, now: float) -> SessionRecord | None:
        """The remembered session with that token hash unless it expired by `now`, or
        None; never does I/O."""
        ...


class Sessions:
    def __init__(
        self,
        store: SessionStore,
        policy: SessionPolicy,
        clock: Callable[[], float] = time.time,
        memo: SessionMemo | None = None,
    ) -> None:
        self._store = store
        self.policy = policy
        self._clock = clock
        self._memo = memo

    def create(
        self,
        user_id: str,
        ip_address: str,
        user_agent: str,
        *,
        level: str = assurance.DEVICE_KEY,
        scope: str = assurance.FULL,
        stepped_up: bool = True,
    ) -> tuple[str, SessionRecord]:
        """Creates a session; returns the token (shown once) and the record.

        `stepped_up`: the login met everything the account requires, so it counts as a
        step-up (sensitive calls are allowed for a while). A recovery session lives
        `recovery_lifetime` in all.
        """
        validation.text(user_agent, "user_agent", max_chars=MAX_USER_AGENT_CHARS, required=False)
        now = self._clock()
        recovery = scope == assurance.RECOVERY
        lifetime = self.policy.recovery_lifetime if recovery else self.policy.max_lifetime
        deadline = now + lifetime
        record = SessionRecord(
            session_id=secrets.token_hex(16),
            user_id=user_id,
            ip_address=ip_address,
            user_agent=user_agent,
            create_time=now,
            absolute_deadline=deadline,
            expire_time=min(now + self.policy.idle_timeout, deadline),
            assurance=Assurance(level, scope, now if stepped_up else None),
        )
        token = new_token()
        event = AuditRecord(
            audit_events.RECOVERY_LOGIN if recovery else audit_events.USER_LOGIN,
            user_id,
            {"session_id": record.session_id, "ip": ip_address, "level": level},
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
        if record is None or now >= self._deadline(record):
            raise Unauthenticated(_REFUSED)
        return self._slide(record, now)

    def validate_remembered(self, token: str) -> SessionRecord | None:
        """What `validate` would return, if memory alone can say so without a write;
        None means "call validate" (no memo, not remembered, a deadline to slide, or a
        refusal: refusals always come from `validate`, after reading the store).

        Runs on the event loop: no I/O, so no worker thread is needed for the hottest
        call in the system.
        """
        if self._memo is None:
            return None
        if not TOKEN_PATTERN.fullmatch(token):
            return None
        now = self._clock()
        record = self._memo.peek(hash_token(token), now)
        if record is None or now >= self._deadline(record) or self._slide_due(record, now):
            return None
        return record

    def _slide_due(self, record: SessionRecord, now: float) -> bool:
        new_expiry = min(now + self.policy.idle_timeout, self._deadline(record))
        return new_expiry - record.expire_time >= self.policy.touch_granularity

    def _deadline(self, record: SessionRecord) -> float:
        """The absolute end of a session: its own, or sooner if the lifetime was lowered
        since it began (the stored idle deadline alone would let it live on)."""
        return min(record.absolute_deadline, record.create_time + self.policy.max_lifetime)

    def _slide(self, record: SessionRecord, now: float, *, force: bool = False) -> SessionRecord:
        if not force and not self._slide_due(record, now):
            return record
        new_expiry = min(now + self.policy.idle_timeout, self._deadline(record))
        try:
            self._store.set_expiry(record.session_id, new_expiry)
        except NoSuchSession:  # logged out or revoked a moment ago
            raise Unauthenticated(_REFUSED) from None
        return dataclasses.replace(record, expire_time=new_expiry)

    def step_up_expire_time(self, record: SessionRecord) -> float | None:
        """Until when the session may make sensitive calls; None if it never stepped up.
        A recovery session may for its whole (short) life."""
        if record.assurance.scope == assurance.RECOVERY:
            return record.absolute_deadline
        if record.assurance.step_up_time is None:
            return None
        return min(record.assurance.step_up_time + self.policy.step_up_max_age,
                   record.absolute_deadline)  # fmt: skip

    def require(
        self,
        record: SessionRecord,
        scopes: frozenset[str] = frozenset({assurance.FULL}),
        *,
        recent_step_up: bool = False,
    ) -> SessionRecord:
        """The record if its scope is one of `scopes` and, for a sensitive call, its
        step-up is recent; otherwise PermissionDenied saying what to do."""
        if record.assurance.scope not in scopes:
            raise PermissionDenied(
                assurance.RESTRICTED_SCOPE.get(record.assurance.scope, assurance.RESTRICTED)
            )
        until = self.step_up_expire_time(record)
        if recent_step_up and (until is None or self._clock() >= until):
            raise PermissionDenied(assurance.STEP_UP_NEEDED)
        return record

    def step_up(self, record: SessionRecord, second_factor: str) -> SessionRecord:
        """Records a step-up: with a second factor (`"totp"`, `"recovery_code"`) the
        session reaches the second-factor level and full scope; with `"device_key"` (an
        account without one) it only becomes recent again."""
        now = self._clock()
        level = record.assurance.level
        if second_factor != "device_key" and level == assurance.DEVICE_KEY:
            level = assurance.DEVICE_KEY_AND_SECOND_FACTOR
        scope = (
            assurance.FULL
            if record.assurance.scope == assurance.STEP_UP_REQUIRED
            else (record.assurance.scope)
        )
        raised = Assurance(level, scope, now)
        event = AuditRecord(
            audit_events.SESSION_STEPPED_UP,
            record.user_id,
            {"session_id": record.session_id, "method": second_factor, "level": level},
            occur_time=now,
        )
        try:
            self._store.set_assurance(record.session_id, raised, event)
        except NoSuchSession:  # logged out or revoked a moment ago
            raise Unauthenticated(_REFUSED) from None
        return dataclasses.replace(record, assurance=raised)

    def touch(self, record: SessionRecord) -> SessionRecord:
        """An explicit touch always moves the deadline, whatever the granularity."""
        return self._slide(record, self._clock(), force=True)

    def last_seen(self, record: SessionRecord) -> float:
        """When the session was last used: the idle deadline is last use + idle timeout,
        so last use is derived, not stored."""
        return max(record.create_time, record.expire_time - self.policy.idle_timeout)

    def list(self, user_id: str, page_size: int = 0, page_token: str = "") -> SessionPage:
        """One page of the user's live sessions, newest first (AIP-158)."""
        if page_size < 0:
            raise InvalidArgument("page_size must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        records = self._store.for_user(user_id, self._clock())
        if page_token:
            after = _parse_page_token(page_token, user_id)
            records = [r for r in records if (r.create_time, r.session_id) < after]
        if len(records) <= size:
            return SessionPage(records, "")
        page = records[:size]
        return SessionPage(page, _page_token(page[-1], user_id))

    def delete(self, caller: SessionRecord, session_id: str) -> None:
        """Raises NoSuchSession unless the session is the caller's."""
        target = session_id or caller.session_id
        event = AuditRecord(audit_events.USER_LOGOUT, caller.user_id, {"session_id": target})
        self._store.delete(caller.user_id, target, event)

    def revoke_others(self, caller: SessionRecord) -> int:
        return self._store.delete_user(
            caller.user_id,
            _revoked(caller.user_id, "others"),
            keep_session_id=caller.session_id,
        )

    def revoke_user(self, user_id: str, keep_session_id: str = "") -> int:
        validation.user_id(user_id)
        return self._store.delete_user(
            user_id,
            _revoked(user_id, "others" if keep_session_id else "all"),
            keep_session_id=keep_session_id or None,
        )

    def cleanup(self) -> int:
        return self._store.delete_expired(self._clock())

    def counts(self) -> tuple[int, int]:
        return self._store.counts(self._clock())


# A page token names the last session of its page (login time, session id) and whose
# sessions were listed, so it cannot be replayed by another user.


def _owner(user_id: str) -> str:
    return hashlib.sha256(user_id.encode()).hexdigest()[:16]


def _page_token(last: SessionRecord, user_id: str) -> str:
    raw = f"v1|{last.create_time!r}|{last.session_id}|{_owner(user_id)}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _parse_page_token(token: str, user_id: str) -> tuple[float, str]:
    bad = InvalidArgument(
        "page_token is not from a previous ListSessions response of yours; start without one"
    )
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        version, create_time, session_id, owner = raw.split("|")
        after = (float(create_time), session_id)
    except (ValueError, UnicodeDecodeError):
        raise bad from None
    if version != "v1" or owner != _owner(user_id):
        raise bad
    return after


def _revoked(user_id: str, scope: str) -> Callable[[int], AuditRecord | None]:
    def event(count: int) -> AuditRecord | None:
        if count == 0:
            return None
        details = {"count": str(count), "scope": scope}
        return AuditRecord(audit_events.SESSIONS_REVOKED, user_id, details)

    return event
