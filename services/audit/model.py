"""What the audit log's rules, storage and transport share: its types and its store
protocol. Domain, stores and servicer import from here; this module imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class NewEvent:
    event_id: str
    action: str
    source: str
    user_id: str
    occur_time: float
    details: dict[str, str]
    # The producer's numbering (see AuditEvent.source_sequence); "" and 0 when absent.
    source_epoch: str = ""
    source_sequence: int = 0


@dataclass(frozen=True)
class StoredEvent:
    sequence: int
    event_id: str
    action: str
    source: str
    user_id: str
    occur_time: float
    record_time: float
    details: dict[str, str]


@dataclass(frozen=True)
class Query:
    user_id: str | None
    action: str | None
    start_time: float | None
    end_time: float | None
    before_sequence: int | None
    limit: int


@dataclass(frozen=True)
class Verification:
    ok: bool
    checked: int
    first_bad_sequence: int = 0
    problem: str = ""
    next_sequence: int = 0  # where the next slice starts; 0 once the end was reached
    total: int = 0


class AuditStore(Protocol):
    """What the audit rules need from storage. Every implementation (SQLite
    today, others later) must pass tests/unit/test_store_contract_audit.py."""

    def append(self, events: list[NewEvent], now: float) -> tuple[int, int]:
        """Appends in order with the next sequence numbers, skipping event ids already
        stored: (appended, duplicates)."""
        ...

    def query(self, query: Query) -> list[StoredEvent]:
        """Matching events, newest (highest sequence) first."""
        ...

    def verify(self, start: int = 1, limit: int = 0) -> Verification:
        """Checks the chain from `start` (at most `limit` events, 0 = all)."""
        ...

    def counts(self) -> dict[str, int]:
        """Events per action."""
        ...
