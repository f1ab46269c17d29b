"""The `FactorStore` contract: what every implementation must do, run against each
backend (tests/support/stores.py).

What each promises: only active users have factors; a TOTP step and a recovery code are
accepted once, also under concurrent calls; activation only takes the pending secret it
was shown; deactivation erases everything; the password budget counts and resets. And,
where rows live in a database: any factors row or recovery code edited, deleted, put back
or moved to another account behind the store's back is an integrity failure, counted,
wherever it is read, and never sealed again.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from prometheus_client import REGISTRY

from services.common.audit_events import AuditRecord
from services.common.errors import IntegrityError
from services.identity.keys import OneTimePrekey, SignedKey
from services.identity.model import NO_FACTORS, FactorStore, NewUser, NoSuchUser
from tests.support.stores import Backend, Tamper

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


# --- rows edited behind the store's back (backends that keep rows in a database) -----


@dataclass
class Stored:
    store: FactorStore
    tamper: Tamper
    alice: int  # users row ids
    bob: int
    digests: list[bytes]  # alice's recovery-code digests before one was used


@pytest.fixture
def stored(sql_backend: Backend) -> Stored:
    """Alice with every factor (a password, TOTP at step 11, recovery codes of which one
    is used, one failed password login); Bob with a password."""
    harness = sql_backend.factors()
    assert harness.tamper is not None
    store, tamper = harness.store, harness.tamper
    rows = []
    for user_id in ("alice", "bob"):
        new = NewUser(user_id, "alias", {}, b"i" * 32, b"v" * 32, SIGNED, PQ, [], 100.0)
        harness.users.add_user(new, AuditRecord("user_registered", user_id))
        rows.append(int(tamper("SELECT max(id) FROM users", ())[0][0]))
        store.set_password(user_id, f"hash of {user_id}", event())
    store.set_pending_totp("alice", "S", event())
    assert store.activate_totp("alice", "S", 10, ["A" * 16, "B" * 16, "C" * 16], event())
    assert store.accept_totp_step("alice", 11)
    assert store.record_password_failure("alice", 100.0, 50.0) == 1
    digests = [
        d for (d,) in tamper("SELECT digest FROM recovery_codes WHERE user_row = ?", (rows[0],))
    ]
    assert store.use_recovery_code("alice", "A" * 16, event())
    return Stored(store, tamper, rows[0], rows[1], [bytes(d) for d in digests])


def put_back_the_used_code(s: Stored) -> None:
    for digest in s.digests:
        s.tamper(
            "INSERT INTO recovery_codes (user_row, digest) SELECT ?, ?"
            " WHERE NOT EXISTS (SELECT 1 FROM recovery_codes WHERE digest = ?)",
            (s.alice, digest, digest),
        )


# Each of the README's attacks on alice's factors (or on bob's, with alice's row).
ATTACKS: dict[str, Callable[[Stored], object]] = {
    "second factor removed": lambda s: s.tamper(
        "UPDATE factors SET totp_secret_ct = NULL WHERE user_row = ?", (s.alice,)
    ),
    "password removed": lambda s: s.tamper(
        "UPDATE factors SET password_ct = NULL WHERE user_row = ?", (s.alice,)
    ),
    "TOTP step rewound": lambda s: s.tamper(
        "UPDATE factors SET totp_last_step = 0 WHERE user_row = ?", (s.alice,)
    ),
    "password budget reset": lambda s: s.tamper(
        "UPDATE factors SET password_failures = 0, password_window_start = NULL WHERE user_row = ?",
        (s.alice,),
    ),
    "pending enrolment planted": lambda s: s.tamper(
        "UPDATE factors SET totp_pending_ct = totp_secret_ct WHERE user_row = ?", (s.alice,)
    ),
    "MAC nulled": lambda s: s.tamper(
        "UPDATE factors SET row_mac = NULL WHERE user_row = ?", (s.alice,)
    ),
    "whole row deleted": lambda s: (
        s.tamper("DELETE FROM recovery_codes WHERE user_row = ?", (s.alice,)),
        s.tamper("DELETE FROM factors WHERE user_row = ?", (s.alice,)),
    ),
    "recovery code deleted": lambda s: s.tamper(
        "DELETE FROM recovery_codes WHERE digest ="
        " (SELECT digest FROM recovery_codes WHERE user_row = ? ORDER BY digest LIMIT 1)",
        (s.alice,),
    ),
    "used recovery code put back": put_back_the_used_code,
    "users row altered": lambda s: s.tamper(
        "UPDATE users SET row_mac = NULL WHERE id = ?", (s.alice,)
    ),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_an_edited_factors_row_is_an_integrity_error_and_never_sealed_again(
    stored: Stored, attack: str
) -> None:
    store = stored.store
    before = integrity_failures()
    ATTACKS[attack](stored)
    for use in (
        lambda: store.get("alice"),
        lambda: store.record_password_failure("alice", 120.0, 50.0),
        lambda: store.accept_totp_step("alice", 99),
        lambda: store.use_recovery_code("alice", "B" * 16, event()),
        lambda: store.reset_password_budget("alice"),
        lambda: store.set_password("alice", "a new hash", event()),
        lambda: store.get("alice"),  # still refused: no write sealed it again
    ):
        with pytest.raises(IntegrityError):
            use()
    assert integrity_failures() > before
    state = store.get("bob")  # the untouched account works
    assert state is not None
    assert state.password_hash == "hash of bob"


def test_a_factors_row_moved_to_another_account_is_an_integrity_error(stored: Stored) -> None:
    # Alice's row (and codes) deleted, Bob's put in its place: his password is now hers.
    stored.tamper("DELETE FROM recovery_codes WHERE user_row = ?", (stored.alice,))
    stored.tamper("DELETE FROM factors WHERE user_row = ?", (stored.alice,))
    stored.tamper("UPDATE factors SET user_row = ? WHERE user_row = ?", (stored.alice, stored.bob))
    with pytest.raises(IntegrityError):
        stored.store.get("alice")
    with pytest.raises(IntegrityError):
        stored.store.rehash_password("alice", "hash of bob", "new", event())


def test_another_accounts_recovery_code_copied_in_is_an_integrity_error(stored: Stored) -> None:
    stored.store.replace_recovery_codes("bob", ["Z" * 16], event())
    stored.tamper(
        "INSERT INTO recovery_codes (user_row, digest)"
        " SELECT ?, digest FROM recovery_codes WHERE user_row = ?",
        (stored.alice, stored.bob),
    )
    with pytest.raises(IntegrityError):
        stored.store.use_recovery_code("alice", "Z" * 16, event())


def integrity_failures() -> float:
    """Identity's row integrity failures counted so far (factors rows, users rows)."""
    return sum(
        REGISTRY.get_sample_value("securemsg_integrity_failures_total", {"field": field}) or 0.0
        for field in ("identity.row/factors", "identity.row/users")
    )
