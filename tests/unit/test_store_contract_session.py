"""The session store contract: what every SessionStore implementation must do, run
against each backend (tests/support/stores.py)."""

from __future__ import annotations

import dataclasses

import pytest

from services.common.audit_events import AuditRecord
from services.session.model import (
    Assurance,
    CountedEvent,
    NoSuchSession,
    SessionRecord,
    SessionStore,
)
from tests.support.stores import Backend, Harness


def record(session_id: str, user_id: str, create: float, expire: float) -> SessionRecord:
    return SessionRecord(session_id, user_id, "10.0.0.1", "phone", create, create + 3600, expire)


def add(store: SessionStore, session_id: str, user_id: str, create: float, expire: float) -> None:
    token_hash = session_id.encode().ljust(32, b"#")
    store.add(
        record(session_id, user_id, create, expire),
        token_hash,
        AuditRecord("user_login", user_id, {"session_id": session_id}),
    )


def counted(scope: str) -> CountedEvent:
    def event(count: int) -> AuditRecord | None:
        if not count:
            return None
        return AuditRecord("sessions_revoked", "u", {"n": str(count), "scope": scope})

    return event


@pytest.fixture
def sessions(backend: Backend) -> Harness[SessionStore]:
    return backend.session()


def test_a_session_is_found_by_its_token_hash_until_it_expires(
    sessions: Harness[SessionStore],
) -> None:
    store = sessions.store
    add(store, "s1", "alice", 100.0, 200.0)
    found = store.by_token(b"s1".ljust(32, b"#"), 150.0)
    assert found == record("s1", "alice", 100.0, 200.0)
    assert store.by_token(b"s1".ljust(32, b"#"), 200.0) is None  # expired at its expire time
    assert store.by_token(b"nope".ljust(32, b"#"), 150.0) is None
    store.set_expiry("s1", 300.0)
    moved = store.by_token(b"s1".ljust(32, b"#"), 250.0)
    assert moved is not None
    assert moved.expire_time == 300.0
    with pytest.raises(NoSuchSession):
        store.set_expiry("gone", 1.0)
    assert sessions.events() == [("user_login", "alice", {"session_id": "s1"})]


def test_a_users_live_sessions_newest_first(sessions: Harness[SessionStore]) -> None:
    store = sessions.store
    add(store, "a1", "alice", 100.0, 1000.0)
    add(store, "a2", "alice", 300.0, 1000.0)
    add(store, "a3", "alice", 300.0, 1000.0)  # same login time: higher session id first
    add(store, "a0", "alice", 50.0, 120.0)  # expired by 150
    add(store, "b1", "bob", 200.0, 1000.0)
    assert [r.session_id for r in store.for_user("alice", 150.0)] == ["a3", "a2", "a1"]
    assert store.for_user("carol", 150.0) == []
    assert store.counts(150.0) == (4, 2)


def test_deleting_checks_the_owner_and_records_only_what_happened(
    sessions: Harness[SessionStore],
) -> None:
    store = sessions.store
    add(store, "a1", "alice", 100.0, 1000.0)
    add(store, "b1", "bob", 100.0, 1000.0)
    with pytest.raises(NoSuchSession):
        store.delete("alice", "b1", AuditRecord("user_logout", "alice", {"session_id": "b1"}))
    store.delete("alice", "a1", AuditRecord("user_logout", "alice", {"session_id": "a1"}))
    with pytest.raises(NoSuchSession):
        store.delete("alice", "a1", AuditRecord("user_logout", "alice", {"session_id": "a1"}))
    assert [r.session_id for r in store.for_user("bob", 150.0)] == ["b1"]
    assert [e[0] for e in sessions.events()] == ["user_login", "user_login", "user_logout"]


def test_revoking_a_users_sessions_can_keep_one(sessions: Harness[SessionStore]) -> None:
    store = sessions.store
    for name in ("a1", "a2", "a3"):
        add(store, name, "alice", 100.0, 1000.0)
    add(store, "b1", "bob", 100.0, 1000.0)
    assert store.delete_user("alice", counted("others"), keep_session_id="a2") == 2
    assert [r.session_id for r in store.for_user("alice", 150.0)] == ["a2"]
    assert store.delete_user("carol", counted("all")) == 0
    assert store.delete_user("alice", counted("all")) == 1
    revoked = [e for e in sessions.events() if e[0] == "sessions_revoked"]
    assert revoked == [
        ("sessions_revoked", "u", {"n": "2", "scope": "others"}),
        ("sessions_revoked", "u", {"n": "1", "scope": "all"}),
    ]  # no event for nothing revoked
    assert store.counts(150.0) == (1, 1)


def test_expired_sessions_are_deleted_in_bulk(sessions: Harness[SessionStore]) -> None:
    store = sessions.store
    add(store, "a1", "alice", 100.0, 200.0)
    add(store, "a2", "alice", 100.0, 300.0)
    add(store, "b1", "bob", 100.0, 250.0)
    assert store.delete_expired(250.0) == 2
    assert store.delete_expired(250.0) == 0
    assert [r.session_id for r in store.for_user("alice", 0.0)] == ["a2"]


def test_a_step_up_is_stored_with_its_event_and_sessions_default_to_device_key(
    sessions: Harness[SessionStore],
) -> None:
    store = sessions.store
    add(store, "s1", "alice", 100.0, 500.0)
    found = store.by_token(b"s1".ljust(32, b"#"), 200.0)
    assert found is not None
    assert found.assurance == Assurance()
    raised = Assurance("device_key_and_second_factor", "full", 150.0)
    store.set_assurance("s1", raised, AuditRecord("session_stepped_up", "alice"))
    found = store.by_token(b"s1".ljust(32, b"#"), 200.0)
    assert found is not None
    assert found.assurance == raised
    assert store.for_user("alice", 200.0)[0].assurance == raised
    with pytest.raises(NoSuchSession):
        store.set_assurance("nope", raised, AuditRecord("session_stepped_up", "alice"))
    assert sessions.events()[-1][0] == "session_stepped_up"


def test_a_recovery_session_keeps_its_scope_and_level(sessions: Harness[SessionStore]) -> None:
    recovery = Assurance("password_and_second_factor", "recovery", 100.0)
    base = record("r1", "alice", 100.0, 400.0)
    sessions.store.add(
        dataclasses.replace(base, assurance=recovery),
        b"r1".ljust(32, b"#"),
        AuditRecord("recovery_login", "alice"),
    )
    found = sessions.store.by_token(b"r1".ljust(32, b"#"), 200.0)
    assert found is not None
    assert found.assurance == recovery
