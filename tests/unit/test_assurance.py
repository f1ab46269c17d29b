"""Session assurance rules: what a device-key login to an account with a second factor
may do, step-ups, sensitive calls, and password (recovery) logins with their limits.

The identity service is the fake directory (its factor rules are in test_factors.py);
sessions live in the in-memory store fake.
"""

from __future__ import annotations

import pytest

from services.client.keys import UserKeys
from services.common import assurance
from services.common.errors import (
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from services.session.login import ChallengeBook, Login, LoginLimits
from services.session.model import SessionRecord
from services.session.recovery import PasswordLimits, PasswordLogin
from services.session.sessions import SessionPolicy, Sessions
from tests.fakes.directory import FakeDirectory
from tests.fakes.outbox import RecordingAuditSink
from tests.fakes.session import MemorySessionStore
from tests.unit.conftest import FakeClock

PASSWORD = "lantern orbit velvet quarry"


@pytest.fixture
def store() -> MemorySessionStore:
    return MemorySessionStore()


@pytest.fixture
def outbox(store: MemorySessionStore) -> RecordingAuditSink:
    return RecordingAuditSink(store.events)


@pytest.fixture
def sessions(store: MemorySessionStore, clock: FakeClock) -> Sessions:
    return Sessions(store, SessionPolicy(step_up_max_age=600, recovery_lifetime=900), clock)


@pytest.fixture
def directory() -> FakeDirectory:
    return FakeDirectory()


@pytest.fixture
def login(
    sessions: Sessions, directory: FakeDirectory, outbox: RecordingAuditSink, clock: FakeClock
) -> Login:
    return Login(
        sessions, directory, ChallengeBook(ttl=60, clock=clock), LoginLimits(), outbox, clock
    )


@pytest.fixture
def password_login(
    sessions: Sessions, directory: FakeDirectory, outbox: RecordingAuditSink
) -> PasswordLogin:
    return PasswordLogin(sessions, directory, PasswordLimits(3, 5, 900), outbox)


def user(directory: FakeDirectory, user_id: str, *, second_factor: bool = False) -> UserKeys:
    keys = UserKeys.generate(0)
    directory.keys[user_id] = keys.verify_key
    if second_factor:
        directory.second_factor.add(user_id)
    return keys


async def sign_in(login: Login, user_id: str, keys: UserKeys) -> SessionRecord:
    challenge = await login.challenge(user_id, "1.2.3.4")
    _, record = await login.sign_in(
        user_id,
        challenge.challenge_id,
        keys.sign_login(user_id, challenge.nonce),
        address="1.2.3.4",
        user_agent="test",
    )
    return record


async def step_up(login: Login, record: SessionRecord, **proof: str) -> SessionRecord:
    return await login.step_up(
        record,
        code=proof.get("code", ""),
        recovery_code=proof.get("recovery_code", ""),
        challenge_id="",
        signature=b"",
        address="1.2.3.4",
    )


async def test_a_device_key_login_to_an_account_with_a_second_factor_can_only_step_up(
    login: Login, sessions: Sessions, directory: FakeDirectory
) -> None:
    record = await sign_in(login, "alice", user(directory, "alice", second_factor=True))
    assert record.assurance.scope == assurance.STEP_UP_REQUIRED
    assert record.assurance.step_up_time is None
    with pytest.raises(PermissionDenied, match="step up"):
        sessions.require(record)
    directory.codes["alice"] = {"123456"}
    with pytest.raises(Unauthenticated):
        await step_up(login, record, code="654321")
    raised = await step_up(login, record, code="123456")
    assert raised.assurance.level == assurance.DEVICE_KEY_AND_SECOND_FACTOR
    assert raised.assurance.scope == assurance.FULL
    sessions.require(raised, recent_step_up=True)
    stored = sessions.list("alice").sessions[0]
    assert stored.assurance == raised.assurance


async def test_sensitive_calls_need_a_recent_step_up(
    login: Login, sessions: Sessions, directory: FakeDirectory, clock: FakeClock
) -> None:
    keys = user(directory, "bob")
    record = await sign_in(login, "bob", keys)
    assert record.assurance.scope == assurance.FULL
    sessions.require(record, recent_step_up=True)  # the login counts
    clock.advance(601)
    sessions.require(record)  # ordinary calls still work
    with pytest.raises(PermissionDenied, match="recent step-up"):
        sessions.require(record, recent_step_up=True)
    # Without a second factor, a fresh device-key signature is the step-up.
    challenge = await login.challenge("bob", "1.2.3.4")
    raised = await login.step_up(
        record,
        code="",
        recovery_code="",
        challenge_id=challenge.challenge_id,
        signature=keys.sign_login("bob", challenge.nonce),
        address="1.2.3.4",
    )
    assert raised.assurance.level == assurance.DEVICE_KEY
    sessions.require(raised, recent_step_up=True)


async def test_an_account_with_a_second_factor_cannot_step_up_by_signature(
    login: Login, directory: FakeDirectory
) -> None:
    keys = user(directory, "alice", second_factor=True)
    record = await sign_in(login, "alice", keys)
    challenge = await login.challenge("alice", "1.2.3.4")
    with pytest.raises(InvalidArgument, match="has a second factor"):
        await login.step_up(
            record,
            code="",
            recovery_code="",
            challenge_id=challenge.challenge_id,
            signature=keys.sign_login("alice", challenge.nonce),
            address="1.2.3.4",
        )


async def test_a_password_login_is_a_short_recovery_session(
    password_login: PasswordLogin, sessions: Sessions, directory: FakeDirectory, clock: FakeClock
) -> None:
    user(directory, "alice", second_factor=True)
    directory.passwords["alice"] = PASSWORD
    directory.codes["alice"] = {"123456"}
    token, record = await password_login.sign_in(
        "alice", PASSWORD, code="123456", recovery_code="", address="1.2.3.4", user_agent=""
    )
    assert record.assurance.scope == assurance.RECOVERY
    assert record.assurance.level == assurance.PASSWORD_AND_SECOND_FACTOR
    assert record.absolute_deadline == clock.now + 900
    with pytest.raises(PermissionDenied, match="recovery session"):
        sessions.require(record)
    sessions.require(record, frozenset({assurance.FULL, assurance.RECOVERY}), recent_step_up=True)
    assert sessions.validate(token).session_id == record.session_id


async def test_guessing_is_bounded_per_account_and_address_not_for_everyone(
    password_login: PasswordLogin, directory: FakeDirectory
) -> None:
    user(directory, "alice")
    directory.passwords["alice"] = PASSWORD

    async def attempt(password: str, address: str) -> None:
        await password_login.sign_in(
            "alice", password, code="", recovery_code="", address=address, user_agent=""
        )

    for _ in range(3):
        with pytest.raises(Unauthenticated):
            await attempt("guess", "6.6.6.6")
    with pytest.raises(ResourceExhausted):
        await attempt(PASSWORD, "6.6.6.6")
    await attempt(PASSWORD, "1.2.3.4")  # the owner, elsewhere, is not locked out


async def test_a_spent_budget_is_resource_exhausted_and_a_device_login_refills_it(
    password_login: PasswordLogin, login: Login, directory: FakeDirectory
) -> None:
    keys = user(directory, "alice")
    directory.passwords["alice"] = PASSWORD
    directory.exhausted.add("alice")
    with pytest.raises(ResourceExhausted):
        await password_login.sign_in(
            "alice", PASSWORD, code="", recovery_code="", address="9.9.9.9", user_agent=""
        )
    await sign_in(login, "alice", keys)
    await password_login.sign_in(
        "alice", PASSWORD, code="", recovery_code="", address="9.9.9.9", user_agent=""
    )
