"""The login protocol on the in-memory session store, with an in-memory identity
directory standing in for the network."""

from __future__ import annotations

import pytest

from services.client.keys import UserKeys
from services.common.errors import InvalidArgument, ResourceExhausted, Unauthenticated, Unavailable
from services.session.login import LOGIN_FAILED, ChallengeBook, Login, LoginLimits
from services.session.sessions import SessionPolicy, Sessions
from tests.fakes.directory import FakeDirectory
from tests.fakes.outbox import RecordingAuditSink
from tests.fakes.session import MemorySessionStore
from tests.unit.conftest import FakeClock

Directory = FakeDirectory


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
    challenge = await login.challenge(user_id, address)
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
    challenge = await login.challenge("alice", "a")
    signature = keys.sign_login("alice", challenge.nonce)
    await login.sign_in("alice", challenge.challenge_id, signature, address="a", user_agent="")
    with pytest.raises(Unauthenticated):
        await login.sign_in("alice", challenge.challenge_id, signature, address="a", user_agent="")


async def test_an_expired_challenge_fails(
    login: Login, directory: Directory, clock: FakeClock
) -> None:
    keys = user(directory, "alice")
    challenge = await login.challenge("alice", "a")
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
    with pytest.raises(ResourceExhausted, match="this account from your address; retry after 900"):
        await sign_in(login, "alice", stranger)
    await sign_in(login, "bob", bob, address="5.6.7.8")


async def test_failures_from_one_address_lock_that_address_but_never_a_correct_signature(
    login: Login, directory: Directory
) -> None:
    stranger = UserKeys.generate(0)
    for i in range(5):
        user(directory, f"user{i}")
        with pytest.raises(Unauthenticated):
            await sign_in(login, f"user{i}", stranger, address="6.6.6.6")
    with pytest.raises(ResourceExhausted, match="your address"):
        await sign_in(login, "user0", stranger, address="6.6.6.6")
    honest = user(directory, "honest")
    await sign_in(login, "honest", honest, address="6.6.6.6")
    await sign_in(login, "honest", honest, address="7.7.7.7")


async def test_attempts_without_a_valid_challenge_never_lock_the_owner_out(
    login: Login, directory: Directory
) -> None:
    # The review's lockout: anyone naming an account with a made-up challenge id and a
    # random signature, no account of their own needed.
    alice = user(directory, "alice")
    for _ in range(20):
        with pytest.raises((Unauthenticated, ResourceExhausted)):
            await login.sign_in(
                "alice", "made-up", bytes(64), address="6.6.6.6", user_agent="attack"
            )
    await sign_in(login, "alice", alice, address="1.2.3.4")
    await sign_in(login, "alice", alice, address="6.6.6.6")  # even from the attacker's address


async def test_failed_real_attempts_limit_only_that_account_from_that_address(
    login: Login, directory: Directory
) -> None:
    alice = user(directory, "alice")
    stranger = UserKeys.generate(0)
    for _ in range(3):
        with pytest.raises(Unauthenticated):
            await sign_in(login, "alice", stranger, address="6.6.6.6")
    with pytest.raises(ResourceExhausted, match="this account from your address"):
        await sign_in(login, "alice", stranger, address="6.6.6.6")
    with pytest.raises(Unauthenticated):  # the same account from elsewhere: not limited
        await sign_in(login, "alice", stranger, address="7.7.7.7")
    await sign_in(login, "alice", alice, address="6.6.6.6")


async def test_ipv6_addresses_of_one_64_share_one_failure_budget(
    login: Login, directory: Directory
) -> None:
    stranger = UserKeys.generate(0)
    for i in range(5):
        user(directory, f"user{i}")
        with pytest.raises(Unauthenticated):
            await sign_in(login, f"user{i}", stranger, address=f"2001:db8:1:2::{i + 1:x}")
    with pytest.raises(ResourceExhausted, match="your address"):
        await sign_in(login, "user0", stranger, address="2001:db8:1:2:ffff::99")
    with pytest.raises(Unauthenticated):  # the next /64 has its own budget
        await sign_in(login, "user0", stranger, address="2001:db8:1:3::1")


async def test_ipv6_addresses_of_one_64_share_one_challenge_budget(login: Login) -> None:
    for i in range(20):
        await login.challenge("alice", f"2001:db8::{i + 1:x}")
    with pytest.raises(ResourceExhausted, match="too many login challenges"):
        await login.challenge("alice", "2001:db8::ffff:1")
    await login.challenge("alice", "2001:db8:0:1::1")


async def issue_until_refused(book: ChallengeBook, group: str) -> int:
    issued = 0
    with pytest.raises(ResourceExhausted, match="unanswered login challenges"):  # noqa: PT012
        while True:
            await book.issue("someone", group)
            issued += 1
    return issued


async def test_a_filling_challenge_book_cuts_back_the_groups_holding_most(clock: FakeClock) -> None:
    book = ChallengeBook(ttl=60, capacity=100, per_group=40, clock=clock)
    # Up to half full every group may hold 40; beyond, 40 * free / 50, shrinking as it fills.
    assert await issue_until_refused(book, "a") == 40
    assert await issue_until_refused(book, "b") == 27
    assert await issue_until_refused(book, "c") == 15
    assert await book.count() == 82  # the book is not full: someone holding none still gets one
    honest = await book.issue("alice", "d")
    assert await book.take(honest.challenge_id, "alice") == honest
    clock.advance(61)  # expired challenges free their groups' allowance
    assert await book.count() == 0
    assert await issue_until_refused(book, "a") == 40


async def test_malformed_requests_are_invalid_argument(login: Login) -> None:
    with pytest.raises(InvalidArgument, match="signature must be 64 bytes"):
        await login.sign_in("alice", "id", b"short", address="a", user_agent="")
    with pytest.raises(InvalidArgument, match="challenge_id is required"):
        await login.sign_in("alice", "", bytes(64), address="a", user_agent="")


async def test_challenges_per_address_are_capped(login: Login) -> None:
    for _ in range(20):
        await login.challenge("alice", "9.9.9.9")
    with pytest.raises(ResourceExhausted, match="too many login challenges"):
        await login.challenge("alice", "9.9.9.9")
    await login.challenge("alice", "8.8.8.8")


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
        ("rate_limit_exceeded", "alice", {"limit": "login_account_address", "ip": "1.2.3.4"})
    ]


async def test_a_login_racing_a_deactivation_leaves_no_session_behind(
    login: Login, directory: Directory, outbox: RecordingAuditSink
) -> None:
    # The key was looked up while the account was active; it was deactivated (and its
    # sessions revoked) before this login's session was written.
    keys = user(directory, "alice")
    directory.deactivated.add("alice")
    with pytest.raises(Unauthenticated):
        await sign_in(login, "alice", keys)
    created = [e.details["session_id"] for e in outbox.events if e.action == "user_login"]
    removed = [e.details["session_id"] for e in outbox.events if e.action == "user_logout"]
    assert created == removed  # the session written was discarded again


async def test_a_login_identity_cannot_confirm_keeps_no_session(
    login: Login, directory: Directory, outbox: RecordingAuditSink
) -> None:
    keys = user(directory, "alice")

    async def unreachable(user_id: str, when: float) -> bool:
        raise Unavailable("identity unreachable")

    directory.record_login = unreachable  # type: ignore[method-assign]
    with pytest.raises(Unavailable):
        await sign_in(login, "alice", keys)
    assert [e.action for e in outbox.events] == ["user_login", "user_logout"]
