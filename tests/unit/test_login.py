"""The login protocol on the in-memory session store, with an in-memory identity
directory standing in for the network."""

from __future__ import annotations

import pytest

from services.client.keys import UserKeys
from services.common.errors import InvalidArgument, ResourceExhausted, Unauthenticated
from services.session.login import LOGIN_FAILED, ChallengeBook, Login, LoginLimits
from services.session.sessions import SessionPolicy, Sessions
from tests.fakes.outbox import RecordingAuditSink
from tests.fakes.session import MemorySessionStore
from tests.unit.conftest import FakeClock


class Directory:
    def __init__(self) -> None:
        self.keys: dict[str, bytes] = {}
        self.logins: list[str] = []

    async def verify_key(self, user_id: str) -> bytes | None:
        return self.keys.get(user_id)

    async def record_login(self, user_id: str, when: float) -> None:
        self.logins.append(user_id)


@pytest.fixture
def directory() -> Directory:
    return Directory()


@pytest.fixture
def outbox() -> RecordingAuditSink:
    return RecordingAuditSink()


@pytest.fixture
def login(outbox: RecordingAuditSink, directory: Directory, clock: FakeClock) -> Login:
    store = MemorySessionStore(outbox.events)  # store changes and failures in one order
    return Login(
        Sessions(store, SessionPolicy(), clock),
        directory,
        ChallengeBook(ttl=60, clock=clock),
        LoginLimits(3, 5, 900, challenges_per_address_per_minute=20),
        outbox,
        clock,
    )


def user(directory: Directory, user_id: str) -> UserKeys:
    keys = UserKeys.generate(0)
    directory.keys[user_id] = keys.verify_key
    return keys


async def sign_in(login: Login, user_id: str, keys: UserKeys, address: str = "1.2.3.4") -> str:
    challenge = login.challenge(user_id, address)
    token, _ = await login.sign_in(
        user_id,
        challenge.challenge_id,
        keys.sign_login(user_id, challenge.nonce),
        address=address,
        user_agent="test",
    )
    return token


async def test_a_valid_signature_creates_a_session_and_records_the_login(
    login: Login, directory: Directory
) -> None:
    token = await sign_in(login, "alice", user(directory, "alice"))
    assert len(token) == 43
    assert directory.logins == ["alice"]


async def test_a_challenge_works_once(login: Login, directory: Directory) -> None:
    keys = user(directory, "alice")
    challenge = login.challenge("alice", "a")
    signature = keys.sign_login("alice", challenge.nonce)
    await login.sign_in("alice", challenge.challenge_id, signature, address="a", user_agent="")
    with pytest.raises(Unauthenticated):
        await login.sign_in("alice", challenge.challenge_id, signature, address="a", user_agent="")


async def test_an_expired_challenge_fails(
    login: Login, directory: Directory, clock: FakeClock
) -> None:
    keys = user(directory, "alice")
    challenge = login.challenge("alice", "a")
    clock.advance(61)
    with pytest.raises(Unauthenticated):
        await login.sign_in(
            "alice",
            challenge.challenge_id,
            keys.sign_login("alice", challenge.nonce),
            address="a",
            user_agent="",
        )


async def test_unknown_users_fail_exactly_like_wrong_signatures(
    login: Login, directory: Directory
) -> None:
    user(directory, "alice")
    stranger = UserKeys.generate(0)
    messages = []
    for user_id in ("alice", "ghost"):
        with pytest.raises(Unauthenticated) as error:
            await sign_in(login, user_id, stranger)
        messages.append(error.value.message)
    assert messages == [LOGIN_FAILED, LOGIN_FAILED]


async def test_failures_lock_the_account_but_not_other_accounts(
    login: Login, directory: Directory
) -> None:
    user(directory, "alice")
    bob = user(directory, "bob")
    stranger = UserKeys.generate(0)
    for _ in range(3):
        with pytest.raises(Unauthenticated):
            await sign_in(login, "alice", stranger)
    with pytest.raises(ResourceExhausted, match="this account; retry after 900 s"):
        await sign_in(login, "alice", stranger)
    await sign_in(login, "bob", bob, address="5.6.7.8")


async def test_failures_from_one_address_lock_that_address(
    login: Login, directory: Directory
) -> None:
    stranger = UserKeys.generate(0)
    for i in range(5):
        user(directory, f"user{i}")
        with pytest.raises(Unauthenticated):
            await sign_in(login, f"user{i}", stranger, address="6.6.6.6")
    honest = user(directory, "honest")
    with pytest.raises(ResourceExhausted, match="your address"):
        await sign_in(login, "honest", honest, address="6.6.6.6")
    await sign_in(login, "honest", honest, address="7.7.7.7")


async def test_malformed_requests_are_invalid_argument(login: Login) -> None:
    with pytest.raises(InvalidArgument, match="signature must be 64 bytes"):
        await login.sign_in("alice", "id", b"short", address="a", user_agent="")
    with pytest.raises(InvalidArgument, match="challenge_id is required"):
        await login.sign_in("alice", "", bytes(64), address="a", user_agent="")


def test_challenges_per_address_are_capped(login: Login) -> None:
    for _ in range(20):
        login.challenge("alice", "9.9.9.9")
    with pytest.raises(ResourceExhausted, match="too many login challenges"):
        login.challenge("alice", "9.9.9.9")
    login.challenge("alice", "8.8.8.8")


async def test_failures_and_the_first_refusal_are_audited_once(
    login: Login, directory: Directory, outbox: RecordingAuditSink
) -> None:
    user(directory, "alice")
    stranger = UserKeys.generate(0)
    for _ in range(3):
        with pytest.raises(Unauthenticated):
            await sign_in(login, "alice", stranger)
    for _ in range(3):
        with pytest.raises(ResourceExhausted):
            await sign_in(login, "alice", stranger)
    events = [(e.action, e.user_id, dict(e.details)) for e in outbox.events]
    assert events == [("user_login_failed", "alice", {"ip": "1.2.3.4"})] * 3 + [
        ("rate_limit_exceeded", "alice", {"limit": "login_account"})
    ]
