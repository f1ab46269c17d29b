"""Session expiry, listing and revocation rules on the in-memory store, with a clock the
test controls."""

from __future__ import annotations

import pytest

from services.common.audit_events import AuditRecord
from services.common.errors import InvalidArgument, NotFound, Unauthenticated
from services.session.model import SessionRecord
from services.session.sessions import SessionPolicy, Sessions, hash_token
from tests.fakes.session import MemorySessionStore
from tests.unit.conftest import FakeClock


@pytest.fixture
def store() -> MemorySessionStore:
    return MemorySessionStore()


@pytest.fixture
def sessions(store: MemorySessionStore, clock: FakeClock) -> Sessions:
    return Sessions(store, SessionPolicy(idle_timeout=1800, max_lifetime=12 * 3600), clock)


def actions(store: MemorySessionStore) -> list[tuple[str, str, dict[str, str]]]:
    return [(e.action, e.user_id, dict(e.details)) for e in store.events]


def test_a_new_token_validates_to_its_user(sessions: Sessions) -> None:
    token, record = sessions.create("alice", "10.0.0.1", "phone")
    assert len(token) == 43
    assert sessions.validate(token).session_id == record.session_id
    assert sessions.validate(token).user_id == "alice"


def test_only_the_hash_of_the_token_is_used_for_lookup() -> None:
    assert hash_token("a" * 43) != hash_token("b" * 43)
    assert len(hash_token("a" * 43)) == 32


def test_idle_sessions_expire(sessions: Sessions, clock: FakeClock) -> None:
    token, _ = sessions.create("alice", "ip", "ua")
    clock.advance(1799)
    sessions.validate(token)  # use slides the deadline
    clock.advance(1799)
    sessions.validate(token)
    clock.advance(1801)
    with pytest.raises(Unauthenticated):
        sessions.validate(token)


def test_a_lowered_lifetime_ends_older_sessions_at_once(
    store: MemorySessionStore, sessions: Sessions, clock: FakeClock
) -> None:
    # The absolute deadline is enforced on validation itself, not only through the idle
    # deadline it caps: restarting with a shorter SESSION_MAX_LIFETIME must take effect.
    token, _ = sessions.create("alice", "ip", "ua")
    shorter = Sessions(store, SessionPolicy(idle_timeout=1800, max_lifetime=3600), clock)
    for _ in range(2):
        clock.advance(1500)
        assert sessions.validate(token).expire_time == clock.now + 1800  # the old policy
    clock.advance(601)  # past the new lifetime, before any stored deadline
    with pytest.raises(Unauthenticated):
        shorter.validate(token)


class RacingStore(MemorySessionStore):
    """A logout lands between the token lookup and the sliding of its deadline."""

    def by_token(self, token_hash: bytes, now: float) -> SessionRecord | None:
        record = super().by_token(token_hash, now)
        if record is not None:
            self.delete(record.user_id, record.session_id, AuditRecord("user_logout"))
        return record


def test_a_session_removed_while_it_is_validated_is_refused(clock: FakeClock) -> None:
    store = RacingStore()
    sessions = Sessions(store, SessionPolicy(idle_timeout=1800, max_lifetime=12 * 3600), clock)
    token, _ = sessions.create("alice", "ip", "ua")
    clock.advance(600)  # far enough for validation to slide (write) the deadline
    with pytest.raises(Unauthenticated):
        sessions.validate(token)


def test_use_cannot_extend_past_the_absolute_lifetime(sessions: Sessions, clock: FakeClock) -> None:
    token, _ = sessions.create("alice", "ip", "ua")
    for _ in range(24):  # 12 hours of use every 30 minutes less a second
        clock.advance(1799)
        sessions.validate(token)
    clock.advance(24 + 1)
    with pytest.raises(Unauthenticated):
        sessions.validate(token)


def test_malformed_tokens_are_unauthenticated_for_users_and_invalid_for_services(
    sessions: Sessions,
) -> None:
    with pytest.raises(Unauthenticated):
        sessions.validate("short")
    with pytest.raises(InvalidArgument):
        sessions.validate("short", strict_shape=True)


def test_revoke_others_keeps_the_current_one(sessions: Sessions) -> None:
    tokens = [sessions.create("alice", "ip", f"ua{i}")[0] for i in range(3)]
    bob, _ = sessions.create("bob", "ip", "ua")
    current = sessions.validate(tokens[1])
    assert sessions.revoke_others(current) == 2
    assert [s.session_id for s in sessions.list("alice").sessions] == [current.session_id]
    sessions.validate(bob)


def test_deleting_someone_elses_session_is_not_found(sessions: Sessions) -> None:
    alice = sessions.validate(sessions.create("alice", "ip", "ua")[0])
    bob_token, bob = sessions.create("bob", "ip", "ua")
    with pytest.raises(NotFound):
        sessions.delete(alice, bob.session_id)
    sessions.validate(bob_token)


def test_cleanup_removes_only_expired_sessions(sessions: Sessions, clock: FakeClock) -> None:
    sessions.create("alice", "ip", "ua")
    clock.advance(1000)
    fresh, _ = sessions.create("bob", "ip", "ua")
    clock.advance(1000)
    assert sessions.cleanup() == 1
    assert sessions.counts() == (1, 1)
    sessions.validate(fresh)


def test_revoke_user_removes_all_of_their_sessions(sessions: Sessions) -> None:
    for _ in range(3):
        sessions.create("alice", "ip", "ua")
    assert sessions.revoke_user("alice") == 3
    assert sessions.list("alice").sessions == []


def test_each_change_leaves_its_audit_event_in_the_outbox(
    sessions: Sessions, store: MemorySessionStore
) -> None:
    token, record = sessions.create("alice", "10.1.2.3", "ua")
    sessions.create("alice", "10.1.2.3", "ua")
    current = sessions.validate(token)
    sessions.revoke_others(current)
    sessions.delete(current, "")
    assert sessions.revoke_user("alice") == 0  # nothing left: no event
    assert actions(store) == [
        ("user_login", "alice", {"session_id": record.session_id, "ip": "10.1.2.3", **LEVEL}),
        (
            "user_login",
            "alice",
            {"session_id": store.events[1].details["session_id"], "ip": "10.1.2.3", **LEVEL},
        ),
        ("sessions_revoked", "alice", {"count": "1", "scope": "others"}),
        ("user_logout", "alice", {"session_id": record.session_id}),
    ]


LEVEL = {"level": "device_key"}


def test_list_pages_newest_first_and_each_session_once(
    sessions: Sessions, clock: FakeClock
) -> None:
    created = []
    for i in range(7):
        created.append(sessions.create("alice", "ip", f"ua{i}")[1].session_id)
        clock.advance(1 if i != 3 else 0)  # two logins in the same instant: ties are ordered
    sessions.create("bob", "ip", "ua")
    seen: list[str] = []
    token = ""
    while True:
        page = sessions.list("alice", page_size=3, page_token=token)
        assert len(page.sessions) <= 3
        seen += [s.session_id for s in page.sessions]
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(created)
    assert len(seen) == 7
    listed = sessions.list("alice").sessions
    assert [s.session_id for s in listed] == seen  # the same order as one big page
    assert [s.create_time for s in listed] == sorted((s.create_time for s in listed), reverse=True)


def test_list_page_size_is_capped_and_bad_tokens_are_invalid(sessions: Sessions) -> None:
    for _ in range(3):
        sessions.create("alice", "ip", "ua")
    sessions.create("bob", "ip", "ua")
    assert len(sessions.list("alice", page_size=10_000).sessions) == 3
    with pytest.raises(InvalidArgument, match="page_size"):
        sessions.list("alice", page_size=-1)
    alices = sessions.list("alice", page_size=1).next_page_token
    with pytest.raises(InvalidArgument, match="page_token"):
        sessions.list("bob", page_token=alices)  # another user's token
    for bad in ("garbage", "djF8eHx5fHo", alices[:-2]):
        with pytest.raises(InvalidArgument, match="page_token"):
            sessions.list("alice", page_token=bad)


def test_last_seen_is_derived_from_the_idle_deadline(sessions: Sessions, clock: FakeClock) -> None:
    token, record = sessions.create("alice", "ip", "ua")
    assert sessions.last_seen(record) == record.create_time
    clock.advance(600)
    touched = sessions.touch(sessions.validate(token))
    assert sessions.last_seen(touched) == clock.now
