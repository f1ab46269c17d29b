"""The `FactorStore` contract: what every implementation must do, run against each
backend (tests/support/stores.py).

What each promises: only active users have factors; a TOTP step and a recovery code are
accepted once, also under concurrent calls; activation only takes the pending secret it
was shown; deactivation erases everything; the password budget counts and resets.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from services.common.audit_events import AuditRecord
from services.identity.keys import OneTimePrekey, SignedKey
from services.identity.model import NO_FACTORS, FactorStore, NewUser, NoSuchUser
from tests.support.stores import Backend

SIGNED = SignedKey(1, b"s" * 32, b"g" * 64)
PQ = SignedKey(1, b"q" * 1184, b"h" * 64)
SETUP_EVENTS = {"user_registered", "user_deactivated"}


def event() -> AuditRecord:
    return AuditRecord("totp_enabled", "alice")


@dataclass
class Subject:
    store: FactorStore
    add_user: Callable[[str], None]
    deactivate: Callable[[str], None]
    events: Callable[[], list[str]]


@pytest.fixture
def subject(backend: Backend) -> Subject:
    harness = backend.factors()
    users = harness.users

    def add_user(user_id: str) -> None:
        new = NewUser(user_id, "alias", {}, b"i" * 32, b"v" * 32, SIGNED, PQ,
                      [OneTimePrekey(1, b"o" * 32)], 100.0)  # fmt: skip
        users.add_user(new, AuditRecord("user_registered", user_id))

    def deactivate(user_id: str) -> None:
        users.deactivate(user_id, 200.0, AuditRecord("user_deactivated", user_id))

    def events() -> list[str]:
        return [action for action, _, _ in harness.events() if action not in SETUP_EVENTS]

    return Subject(harness.store, add_user, deactivate, events)


def test_unknown_and_deactivated_users_have_no_factors(subject: Subject) -> None:
    store = subject.store
    assert store.get("nobody") is None
    with pytest.raises(NoSuchUser):
        store.set_pending_totp("nobody", "SECRET", event())
    subject.add_user("alice")
    assert store.get("alice") == NO_FACTORS
    store.set_pending_totp("alice", "PENDING", event())
    store.replace_recovery_codes("alice", ["A" * 16], event())
    store.set_password("alice", "$argon2id$hash", event())
    subject.deactivate("alice")
    assert store.get("alice") is None
    with pytest.raises(NoSuchUser):
        store.use_recovery_code("alice", "A" * 16, event())


def test_activation_takes_only_the_pending_secret_it_was_shown(subject: Subject) -> None:
    store = subject.store
    subject.add_user("alice")
    store.set_pending_totp("alice", "FIRST", event())
    store.set_pending_totp("alice", "SECOND", event())  # replaces the first
    assert not store.activate_totp("alice", "FIRST", 7, ["C" * 16], event())
    assert store.activate_totp("alice", "SECOND", 7, ["C" * 16], event())
    assert not store.activate_totp("alice", "SECOND", 8, [], event())  # done already
    state = store.get("alice")
    assert state is not None
    assert (state.totp_secret, state.totp_pending, state.totp_last_step) == ("SECOND", None, 7)
    assert state.recovery_codes == 1


def test_a_time_step_is_accepted_once_and_never_an_earlier_one(subject: Subject) -> None:
    store = subject.store
    subject.add_user("alice")
    assert not store.accept_totp_step("alice", 5)  # no active factor yet
    store.set_pending_totp("alice", "S", event())
    store.activate_totp("alice", "S", 10, [], event())
    assert not store.accept_totp_step("alice", 10)  # the activation code's step
    assert store.accept_totp_step("alice", 11)
    assert not store.accept_totp_step("alice", 11)
    assert not store.accept_totp_step("alice", 9)


def test_concurrent_calls_with_one_step_or_one_code_succeed_once(subject: Subject) -> None:
    store = subject.store
    subject.add_user("alice")
    store.set_pending_totp("alice", "S", event())
    store.activate_totp("alice", "S", 1, ["R" * 16], event())
    with ThreadPoolExecutor(8) as pool:
        steps = list(pool.map(lambda _: store.accept_totp_step("alice", 2), range(16)))
        codes = list(
            pool.map(lambda _: store.use_recovery_code("alice", "R" * 16, event()), range(16))
        )
    assert steps.count(True) == 1
    assert codes.count(True) == 1


def test_recovery_codes_work_once_and_regenerating_replaces_the_set(subject: Subject) -> None:
    store = subject.store
    subject.add_user("alice")
    store.replace_recovery_codes("alice", ["A" * 16, "B" * 16], event())
    assert store.use_recovery_code("alice", "A" * 16, event())
    assert not store.use_recovery_code("alice", "A" * 16, event())
    store.replace_recovery_codes("alice", ["C" * 16], event())
    assert not store.use_recovery_code("alice", "B" * 16, event())  # the old set is gone
    state = store.get("alice")
    assert state is not None
    assert state.recovery_codes == 1


def test_removing_totp_keeps_the_password_and_reports_whether_there_was_one(
    subject: Subject,
) -> None:
    store = subject.store
    subject.add_user("alice")
    assert not store.remove_totp("alice", event())
    store.set_password("alice", "H1", event())
    store.set_pending_totp("alice", "S", event())
    store.activate_totp("alice", "S", 1, [], event())
    assert store.remove_totp("alice", event())
    state = store.get("alice")
    assert state is not None
    assert (state.totp_secret, state.password_hash) == (None, "H1")


def test_password_budget_counts_per_window_and_resets(subject: Subject) -> None:
    store = subject.store
    subject.add_user("alice")
    assert store.record_password_failure("nobody", 100.0, 50.0) is None
    assert [store.record_password_failure("alice", 100.0 + i, 50.0) for i in range(3)] == [1, 2, 3]
    assert store.record_password_failure("alice", 160.0, 50.0) == 1  # a new window
    store.reset_password_budget("alice")
    state = store.get("alice")
    assert state is not None
    assert state.password_failures == 0
    store.record_password_failure("alice", 200.0, 50.0)
    store.set_password("alice", "H", event())  # a new password starts a clean budget
    state = store.get("alice")
    assert state is not None
    assert state.password_failures == 0


def test_rehash_replaces_only_the_hash_it_was_given(subject: Subject) -> None:
    store = subject.store
    subject.add_user("alice")
    store.set_password("alice", "OLD", event())
    assert not store.rehash_password("alice", "OTHER", "NEW", event())
    assert store.rehash_password("alice", "OLD", "NEW", event())
    state = store.get("alice")
    assert state is not None
    assert state.password_hash == "NEW"


def test_changes_leave_their_events_and_failed_ones_none(subject: Subject) -> None:
    store = subject.store
    subject.add_user("alice")
    store.replace_recovery_codes("alice", ["A" * 16], AuditRecord("recovery_codes_generated"))
    store.use_recovery_code("alice", "Z" * 16, AuditRecord("recovery_code_used"))  # wrong
    store.use_recovery_code("alice", "A" * 16, AuditRecord("recovery_code_used"))
    store.remove_totp("alice", AuditRecord("totp_removed"))  # none active
    assert subject.events() == ["recovery_codes_generated", "recovery_code_used"]
