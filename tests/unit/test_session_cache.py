"""The session cache answers validations from memory, and never with a session that a
committed change has revoked, ended, expired or restricted.

The cache sits in front of the real SQLite store (the one the service runs on), with a
clock the test controls; the store contract suite also runs through it
(tests/support/stores.py, backend "sqlite+cache").
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.common import assurance
from services.common.errors import PermissionDenied, Unauthenticated
from services.common.outbox import SqliteOutbox
from services.common.sqlite import open_database
from services.session.cache import CachedSessionStore
from services.session.model import SessionRecord
from services.session.sessions import SessionPolicy, Sessions, hash_token
from services.session.store import MIGRATIONS, SqliteSessionStore
from tests.unit.conftest import FakeClock

POLICY = SessionPolicy(idle_timeout=1800, max_lifetime=12 * 3600)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteSessionStore]:
    opened = open_database(
        tmp_path / "session.db",
        service="session",
        master_key="session cache test key",
        kdf_iterations=1_000,
        migrations=MIGRATIONS,
        synchronous="NORMAL",
    )
    outbox = SqliteOutbox(opened.database, opened.keyring, "session")
    yield SqliteSessionStore(opened.database, opened.keyring, outbox)
    opened.database.close()


@pytest.fixture
def cached(store: SqliteSessionStore) -> CachedSessionStore:
    return CachedSessionStore(store, max_entries=100)


@pytest.fixture
def sessions(cached: CachedSessionStore, clock: FakeClock) -> Sessions:
    return Sessions(cached, POLICY, clock, memo=cached)


def test_a_validated_session_is_then_answered_from_memory(
    sessions: Sessions, cached: CachedSessionStore
) -> None:
    token, record = sessions.create("alice", "10.0.0.1", "phone")
    assert sessions.validate_remembered(token) is None  # nothing read yet
    assert sessions.validate(token).session_id == record.session_id
    remembered = sessions.validate_remembered(token)
    assert remembered is not None
    assert remembered.session_id == record.session_id
    assert remembered.user_id == "alice"
    assert remembered.ip_address == "10.0.0.1"
    assert len(cached) == 1


def test_a_malformed_or_unknown_token_is_never_answered_from_memory(sessions: Sessions) -> None:
    token, _ = sessions.create("alice", "ip", "ua")
    sessions.validate(token)
    assert sessions.validate_remembered("x" * 43) is None
    assert sessions.validate_remembered(token[:-1]) is None
    with pytest.raises(Unauthenticated):
        sessions.validate("x" * 43)


def test_logging_out_is_seen_at_once(sessions: Sessions) -> None:
    token, record = sessions.create("alice", "ip", "ua")
    sessions.validate(token)
    sessions.delete(record, "")
    assert sessions.validate_remembered(token) is None
    with pytest.raises(Unauthenticated):
        sessions.validate(token)


def test_revoking_a_users_sessions_is_seen_at_once_except_the_one_kept(
    sessions: Sessions,
) -> None:
    first, kept = sessions.create("alice", "ip", "ua")
    second, _ = sessions.create("alice", "ip", "ua")
    other, _ = sessions.create("bob", "ip", "ua")
    for token in (first, second, other):
        sessions.validate(token)
    sessions.revoke_user("alice", keep_session_id=kept.session_id)
    assert sessions.validate_remembered(second) is None
    with pytest.raises(Unauthenticated):
        sessions.validate(second)
    assert sessions.validate_remembered(first) is not None
    assert sessions.validate_remembered(other) is not None
    sessions.revoke_user("alice")
    assert sessions.validate_remembered(first) is None


def test_an_idle_or_absolute_deadline_is_never_passed_in_memory(
    sessions: Sessions, clock: FakeClock
) -> None:
    token, _ = sessions.create("alice", "ip", "ua")
    sessions.validate(token)
    clock.advance(1801)  # idle deadline passed with no use in between
    assert sessions.validate_remembered(token) is None
    with pytest.raises(Unauthenticated):
        sessions.validate(token)

    token, _ = sessions.create("bob", "ip", "ua")
    for _ in range(30):  # used every 1700 s: it slides, then meets its 12 h lifetime
        clock.advance(1700)
        if sessions.validate_remembered(token) is None:
            try:
                sessions.validate(token)
            except Unauthenticated:
                break
    else:
        pytest.fail("the session outlived its absolute lifetime")
    assert sessions.validate_remembered(token) is None


def test_a_slide_due_goes_to_the_store_and_is_written(
    sessions: Sessions, store: SqliteSessionStore, clock: FakeClock
) -> None:
    token, _ = sessions.create("alice", "ip", "ua")
    sessions.validate(token)
    clock.advance(POLICY.touch_granularity + 1)
    assert sessions.validate_remembered(token) is None  # a write is due: not from memory
    slid = sessions.validate(token)
    stored = store.by_token(hash_token(token), clock())
    assert stored is not None
    assert stored.expire_time == slid.expire_time


def test_a_step_up_or_a_scope_change_is_seen_at_once(sessions: Sessions) -> None:
    token, record = sessions.create("alice", "ip", "ua", scope=assurance.STEP_UP_REQUIRED)
    sessions.validate(token)
    remembered = sessions.validate_remembered(token)
    assert remembered is not None
    with pytest.raises(PermissionDenied):
        sessions.require(remembered)
    sessions.step_up(record, "totp")
    raised = sessions.validate_remembered(token) or sessions.validate(token)
    assert raised.assurance.scope == assurance.FULL
    assert raised.assurance.level == assurance.DEVICE_KEY_AND_SECOND_FACTOR


def test_expired_sessions_removed_in_bulk_leave_memory_too(
    sessions: Sessions, cached: CachedSessionStore, clock: FakeClock
) -> None:
    token, _ = sessions.create("alice", "ip", "ua")
    sessions.validate(token)
    clock.advance(3600)
    assert sessions.cleanup() == 1
    assert len(cached) == 0


def test_a_row_read_before_a_revocation_committed_is_not_remembered(
    store: SqliteSessionStore, cached: CachedSessionStore, sessions: Sessions
) -> None:
    """A validation reads the row; a revocation commits; then the validation would fill
    the cache with what it read. The fill must be dropped."""
    token, record = sessions.create("alice", "ip", "ua")
    read, revoked = threading.Event(), threading.Event()
    original = store.by_token

    def slow_read(token_hash: bytes, now: float) -> SessionRecord | None:
        found = original(token_hash, now)
        read.set()
        revoked.wait()
        return found

    store.by_token = slow_read  # type: ignore[method-assign]
    answers: list[SessionRecord] = []
    validation = threading.Thread(target=lambda: answers.append(sessions.validate(token)))
    validation.start()
    read.wait()
    store.by_token = original  # type: ignore[method-assign]
    sessions.revoke_user("alice")
    revoked.set()
    validation.join()

    assert answers
    assert answers[0].session_id == record.session_id
    assert sessions.validate_remembered(token) is None
    with pytest.raises(Unauthenticated):
        sessions.validate(token)


def test_memory_holds_at_most_its_bound(store: SqliteSessionStore, clock: FakeClock) -> None:
    cached = CachedSessionStore(store, max_entries=3)
    sessions = Sessions(cached, POLICY, clock, memo=cached)
    tokens = [sessions.create(f"user{i}", "ip", "ua")[0] for i in range(5)]
    for token in tokens:
        sessions.validate(token)
    assert len(cached) == 3
    assert [sessions.validate_remembered(t) is not None for t in tokens] == [
        False,
        False,
        True,
        True,
        True,
    ]


def test_without_a_memo_nothing_is_answered_from_memory(
    store: SqliteSessionStore, clock: FakeClock
) -> None:
    sessions = Sessions(store, POLICY, clock)
    token, _ = sessions.create("alice", "ip", "ua")
    sessions.validate(token)
    assert sessions.validate_remembered(token) is None


def test_memory_never_answers_for_a_session_past_its_idle_deadline(
    sessions: Sessions, cached: CachedSessionStore, clock: FakeClock
) -> None:
    token, record = sessions.create("alice", "ip", "ua")
    sessions.validate(token)
    assert cached.peek(hash_token(token), record.expire_time - 1) is not None
    assert cached.peek(hash_token(token), record.expire_time) is None
    assert len(cached) == 0  # and the entry is gone


def test_the_lifetime_is_checked_whatever_memory_says(clock: FakeClock) -> None:
    """Each check stands on its own: a memo that (wrongly) kept a session whose idle
    deadline outlives its lifetime is still refused by the rules."""
    long_idle = SessionRecord(
        "s1", "alice", "ip", "ua", clock() - POLICY.max_lifetime - 1, clock() + 10, clock() + 900
    )

    class Forgetful:
        def peek(self, token_hash: bytes, now: float) -> SessionRecord | None:
            return long_idle

    store: Any = _NoStore()
    sessions = Sessions(store, POLICY, clock, memo=Forgetful())
    assert sessions.validate_remembered("a" * 43) is None


class _NoStore:
    """A store that must not be reached."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the store was asked ({name})")
