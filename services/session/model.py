"""What session's rules, storage and transport share: its types, its store protocol, its
errors. Domain, stores and servicer import from here; this module imports none of them.

"Not found" is said one way: lookups return None, commands raise `NoSuchSession`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from services.common import assurance
from services.common.audit_events import AuditRecord
from services.common.errors import NotFound


@dataclass(frozen=True)
class Assurance:
    """How a session was authenticated and what it may do (services.common.assurance
    names); `step_up_time` is when it last proved its account's strongest factor."""

    level: str = assurance.DEVICE_KEY
    scope: str = assurance.FULL
    step_up_time: float | None = None


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    user_id: str
    ip_address: str
    user_agent: str
    create_time: float
    absolute_deadline: float
    expire_time: float
    # Sessions stored before assurance levels existed read as device key, full scope,
    # never stepped up.
    assurance: Assurance = Assurance()


# Builds the audit event for a bulk deletion once its count is known (None: no event).
CountedEvent = Callable[[int], AuditRecord | None]


class NoSuchSession(NotFound):
    """A command named a session that does not exist (or is not the given user's)."""

    def __init__(self) -> None:
        super().__init__("no session of yours has that session_id")


class SessionStore(Protocol):
    """What the session rules need from storage. Every implementation (SQLite
    today, others later) must pass tests/unit/test_store_contract_session.py.

    Every change that takes an audit event stores it in the same transaction.
    """

    def add(self, record: SessionRecord, token_hash: bytes, audit: AuditRecord) -> None: ...

    def by_token(self, token_hash: bytes, now: float) -> SessionRecord | None:
        """The session with that token hash, unless it expired by `now`."""
        ...

    def set_expiry(self, session_id: str, expire_time: float) -> None:
        """Raises NoSuchSession."""
        ...

    def set_assurance(self, session_id: str, assurance: Assurance, audit: AuditRecord) -> None:
        """Records a step-up. Raises NoSuchSession."""
        ...

    def for_user(self, user_id: str, now: float) -> list[SessionRecord]:
        """The user's sessions not expired by `now`, newest first (ties: higher
        session_id first)."""
        ...

    def delete(self, user_id: str, session_id: str, audit: AuditRecord) -> None:
        """Raises NoSuchSession, also when the session is another user's."""
        ...

    def delete_user(
        self, user_id: str, audit: CountedEvent, *, keep_session_id: str | None = None
    ) -> int:
        """Deletes the user's sessions but `keep_session_id`; returns how many."""
        ...

    def delete_expired(self, now: float) -> int: ...

    def counts(self, now: float) -> tuple[int, int]:
        """(live sessions, distinct users with one)."""
        ...
