"""Factor rules on the in-memory store: TOTP enrolment and codes, recovery codes, the
password and its budget. Fast: no network, no SQLite, Argon2id at its smallest."""

from __future__ import annotations

import argon2
import pytest

from services.common.audit_events import AuditRecord
from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
)
from services.identity import totp
from services.identity.factors import FactorLimits, Factors
from services.identity.keys import SignedKey
from services.identity.model import NewUser
from services.identity.passwords import HashParameters, PasswordHasher
from tests.fakes.identity import MemoryFactorStore
from tests.fakes.outbox import RecordingAuditSink
from tests.unit.conftest import FakeClock

PASSWORD = "lantern orbit velvet quarry"
HASHER = PasswordHasher(HashParameters(time_cost=1, memory_kib=1024))


def actions(events: list[AuditRecord]) -> list[str]:
    return [e.action for e in events]


@pytest.fixture
def store() -> MemoryFactorStore:
    store = MemoryFactorStore()
    key = SignedKey(1, b"s" * 32, b"g" * 64)
    alice = NewUser("alice", "Alice Liddell", {}, b"i" * 32, b"v" * 32, key, key, [], 0.0)
    store.users.add_user(alice, AuditRecord("user_registered", "alice"))
    store.events.clear()
    return store


@pytest.fixture
def audit() -> RecordingAuditSink:
    return RecordingAuditSink()


@pytest.fixture
def factors(store: MemoryFactorStore, audit: RecordingAuditSink, clock: FakeClock) -> Factors:
    return Factors(
        store,
        store.users,
        HASHER,
        audit,
        clock,
        FactorLimits(code_failures_per_account=3, password_budget=4),
    )


def wrong_code(code: str) -> str:
    """`code` with its last character changed (to one it surely is not)."""
    return code[:-1] + ("Y" if code.endswith("Z") else "Z")


def enrol(factors: Factors, clock: FakeClock) -> tuple[str, list[str]]:
    secret = factors.begin_totp("alice").secret
    codes = factors.activate_totp("alice", totp.code_at(secret, clock.now))
    return secret, codes


def test_enrolment_is_active_only_after_a_first_valid_code(
    factors: Factors, clock: FakeClock, store: MemoryFactorStore
) -> None:
    enrollment = factors.begin_totp("alice")
    assert enrollment.uri.startswith("otpauth://totp/SecureMsg:alice?secret=")
    assert len(enrollment.secret) == 32
    assert not factors.second_factor_enabled("alice")
    with pytest.raises(Unauthenticated):
        factors.activate_totp(
            "alice",
            "000000" if totp.code_at(enrollment.secret, clock.now) != "000000" else "111111",
        )
    codes = factors.activate_totp("alice", totp.code_at(enrollment.secret, clock.now))
    assert len(codes) == 10
    assert len(set(codes)) == 10
    assert factors.second_factor_enabled("alice")
    assert factors.summary("alice").recovery_codes_remaining == 10
    assert actions(store.events) == ["totp_enrollment_started", "totp_enabled"]
    with pytest.raises(FailedPrecondition):
        factors.begin_totp("alice")


def test_a_code_works_once_and_the_next_step_works_again(
    factors: Factors, clock: FakeClock
) -> None:
    secret, _ = enrol(factors, clock)
    clock.advance(30)
    code = totp.code_at(secret, clock.now)
    assert factors.verify_second_factor("alice", code, "") == "totp"
    with pytest.raises(Unauthenticated):
        factors.verify_second_factor("alice", code, "")
    clock.advance(30)
    assert factors.verify_second_factor("alice", totp.code_at(secret, clock.now), "") == "totp"


def test_clock_skew_of_one_step_either_way_and_no_more(factors: Factors, clock: FakeClock) -> None:
    secret, _ = enrol(factors, clock)
    clock.advance(300)
    assert factors.verify_second_factor("alice", totp.code_at(secret, clock.now + 30), "")
    clock.advance(120)
    assert factors.verify_second_factor("alice", totp.code_at(secret, clock.now - 30), "")
    clock.advance(120)
    with pytest.raises(Unauthenticated):
        factors.verify_second_factor("alice", totp.code_at(secret, clock.now + 60), "")


def test_recovery_codes_work_once_each_in_any_spelling(factors: Factors, clock: FakeClock) -> None:
    _, codes = enrol(factors, clock)
    assert factors.verify_second_factor("alice", "", codes[0].lower().replace("-", " ")) == (
        "recovery_code"
    )
    with pytest.raises(Unauthenticated):
        factors.verify_second_factor("alice", "", codes[0])
    assert factors.summary("alice").recovery_codes_remaining == 9
    new = factors.regenerate_recovery_codes("alice")
    with pytest.raises(Unauthenticated):
        factors.verify_second_factor("alice", "", codes[1])  # the old set is gone
    assert factors.verify_second_factor("alice", "", new[1]) == "recovery_code"


def test_wrong_codes_are_audited_and_bounded_per_account(
    factors: Factors, clock: FakeClock, audit: RecordingAuditSink
) -> None:
    secret, _ = enrol(factors, clock)
    wrong = "123456" if totp.code_at(secret, clock.now) != "123456" else "654321"
    for _ in range(3):
        with pytest.raises(Unauthenticated):
            factors.verify_second_factor("alice", wrong, "")
    with pytest.raises(ResourceExhausted):
        factors.verify_second_factor("alice", totp.code_at(secret, clock.now + 30), "")
    assert actions(audit.events) == ["second_factor_failed"] * 3


def test_removal_needs_a_code_and_takes_the_factor(factors: Factors, clock: FakeClock) -> None:
    with pytest.raises(FailedPrecondition):
        factors.remove_totp("alice", "123456", "")
    _, codes = enrol(factors, clock)
    with pytest.raises(InvalidArgument):
        factors.remove_totp("alice", "", "")
    factors.remove_totp("alice", "", codes[3])
    assert not factors.second_factor_enabled("alice")


def test_the_password_rules(factors: Factors) -> None:
    for bad, rule in [
        ("short words", "at least 15"),
        ("alice" + "x7Qp!vR2#mZ9wL4", "user id or alias"),
        ("Alice Liddell rides again", "user id or alias"),
        ("passwordpassword1", "too common"),
        ("qwertyuiopasdfgh", "too common"),
        ("x" * 257, "at most 256"),
    ]:
        with pytest.raises(InvalidArgument, match=rule):
            factors.set_password("alice", bad)
    factors.set_password("alice", PASSWORD)
    assert factors.summary("alice").password_set


def test_password_login_with_and_without_a_second_factor(
    factors: Factors, clock: FakeClock
) -> None:
    factors.set_password("alice", PASSWORD)
    assert factors.verify_password("alice", PASSWORD, "", "") == "none"
    secret, codes = enrol(factors, clock)
    with pytest.raises(Unauthenticated):
        factors.verify_password("alice", PASSWORD, "", "")  # the code is now required
    clock.advance(30)
    assert factors.verify_password("alice", PASSWORD, totp.code_at(secret, clock.now), "") == (
        "totp"
    )
    assert factors.verify_password("alice", PASSWORD, "", codes[0]) == "recovery_code"


def test_unknown_users_and_wrong_passwords_fail_alike(factors: Factors) -> None:
    factors.set_password("alice", PASSWORD)
    messages = []
    for user_id, password in [("alice", "wrong " + PASSWORD), ("nobody", PASSWORD)]:
        with pytest.raises(Unauthenticated) as error:
            factors.verify_password(user_id, password, "", "")
        messages.append(error.value.message)
    assert messages[0] == messages[1]


def test_the_budget_is_spent_by_anyone_and_refilled_by_the_owner(
    factors: Factors, clock: FakeClock
) -> None:
    factors.set_password("alice", PASSWORD)
    _, codes = enrol(factors, clock)
    for _ in range(4):
        with pytest.raises(Unauthenticated):
            factors.verify_password("alice", "a stranger's guess", "", "")
    with pytest.raises(ResourceExhausted, match="device key"):
        factors.verify_password("alice", PASSWORD, "", wrong_code(codes[0]))
    # A recovery code refills it (and counts as the second factor).
    assert factors.verify_password("alice", PASSWORD, "", codes[1]) == "recovery_code"
    for _ in range(4):
        with pytest.raises(Unauthenticated):
            factors.verify_password("alice", "a stranger's guess", "", "")
    factors.refill_password_budget("alice")  # a device-key login
    assert factors.verify_password("alice", PASSWORD, "", codes[2]) == "recovery_code"


def test_unknown_ids_have_a_budget_too(factors: Factors) -> None:
    for _ in range(4):
        with pytest.raises(Unauthenticated):
            factors.verify_password("nobody", PASSWORD, "", "")
    with pytest.raises(ResourceExhausted):
        factors.verify_password("nobody", PASSWORD, "", "")


def test_hashes_move_to_new_parameters_at_login(
    store: MemoryFactorStore, audit: RecordingAuditSink, clock: FakeClock
) -> None:
    old = Factors(store, store.users, HASHER, audit, clock)
    old.set_password("alice", PASSWORD)
    stronger = PasswordHasher(HashParameters(time_cost=2, memory_kib=2048))
    new = Factors(store, store.users, stronger, audit, clock)
    new.verify_password("alice", PASSWORD, "", "")
    state = store.get("alice")
    assert state is not None
    assert state.password_hash is not None
    assert "m=2048,t=2" in state.password_hash
    assert "password_rehashed" in actions(store.events)
    assert new.verify_password("alice", PASSWORD, "", "") == "none"


def test_deactivated_users_have_no_factors(factors: Factors, store: MemoryFactorStore) -> None:
    store.users.deactivate("alice", 1.0, AuditRecord("user_deactivated", "alice"))
    with pytest.raises(NotFound):
        factors.summary("alice")


def test_the_decoy_costs_what_a_real_check_costs() -> None:
    """Same algorithm and parameters, so checking a guess against the decoy (unknown user,
    no password) does the same work as against a real hash."""
    real = HASHER.hash("some long passphrase here")
    assert argon2.extract_parameters(HASHER.decoy) == argon2.extract_parameters(real)
    assert not HASHER.verify(HASHER.decoy, "some long passphrase here")
