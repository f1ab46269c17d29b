"""The audit store contract: what every AuditStore implementation must do, run against
each backend (tests/support/stores.py). Tampering is backend-specific and tested with
the SQLite store and over RPC."""

from __future__ import annotations

import pytest

from services.audit.model import AuditStore, NewEvent, Query
from tests.support.stores import Backend


def events(*specs: tuple[str, str, str, float]) -> list[NewEvent]:
    return [
        NewEvent(event_id, action, "session", user_id, when, {"k": event_id})
        for event_id, action, user_id, when in specs
    ]


def query(**filters: object) -> Query:
    fields: dict[str, object] = {
        "user_id": None,
        "action": None,
        "start_time": None,
        "end_time": None,
        "before_sequence": None,
        "limit": 100,
    }
    fields.update(filters)
    return Query(**fields)  # type: ignore[arg-type]


@pytest.fixture
def log(backend: Backend) -> AuditStore:
    store = backend.audit()
    store.append(
        events(
            ("e1", "user_login", "alice", 10.0),
            ("e2", "user_login", "bob", 20.0),
            ("e3", "user_logout", "alice", 30.0),
            ("e4", "rate_limit_exceeded", "", 40.0),
        ),
        now=50.0,
    )
    return store


def test_events_get_the_next_sequence_numbers_and_retries_are_skipped(log: AuditStore) -> None:
    again = events(("e3", "user_logout", "alice", 30.0), ("e5", "user_login", "carol", 60.0))
    assert log.append(again, now=70.0) == (1, 1)
    newest = log.query(query(limit=1))[0]
    assert (newest.sequence, newest.event_id, newest.record_time) == (5, "e5", 70.0)
    assert (newest.user_id, newest.details, newest.source) == ("carol", {"k": "e5"}, "session")
    assert log.counts() == {"user_login": 3, "user_logout": 1, "rate_limit_exceeded": 1}


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({}, ["e4", "e3", "e2", "e1"]),
        ({"user_id": "alice"}, ["e3", "e1"]),
        ({"action": "user_login"}, ["e2", "e1"]),
        ({"start_time": 20.0, "end_time": 40.0}, ["e3", "e2"]),
        ({"before_sequence": 3}, ["e2", "e1"]),
        ({"limit": 2}, ["e4", "e3"]),
        ({"user_id": "nobody"}, []),
    ],
)
def test_queries_filter_newest_first(
    log: AuditStore, filters: dict[str, object], expected: list[str]
) -> None:
    assert [e.event_id for e in log.query(query(**filters))] == expected


def test_an_untouched_log_verifies_whole_and_in_slices(log: AuditStore) -> None:
    whole = log.verify()
    assert (whole.ok, whole.checked, whole.total, whole.next_sequence) == (True, 4, 4, 0)
    first = log.verify(1, 3)
    assert (first.ok, first.checked, first.next_sequence) == (True, 3, 4)
    rest = log.verify(first.next_sequence, 3)
    assert (rest.ok, rest.checked, rest.next_sequence) == (True, 1, 0)
