"""Login state shared by session replicas through Redis: two `Login`s on one private
Redis stand for two session processes (challenges and limits in Redis, sessions in one
store, as a shared database would hold them)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from services.client.keys import UserKeys
from services.common import shared_state
from services.common.errors import ResourceExhausted, Unauthenticated
from services.common.ratelimit import WindowLimit
from services.session.login import Challenge, Login, LoginLimits
from services.session.redis_challenges import RedisChallengeBook
from services.session.sessions import SessionPolicy, Sessions
from tests.fakes.directory import FakeDirectory
from tests.fakes.outbox import RecordingAuditSink
from tests.fakes.session import MemorySessionStore
from tests.support.redis import RedisServer, prefix


@contextlib.asynccontextmanager
async def replicas(
    server: RedisServer, count: int = 2, *, ttl: float = 60, capacity: int = 100_000
) -> AsyncIterator[tuple[list[Login], FakeDirectory]]:
    directory = FakeDirectory()
    outbox = RecordingAuditSink()
    sessions = Sessions(MemorySessionStore(outbox.events), SessionPolicy())
    names = shared_state.KeyNames(b"k" * 32, prefix())
    clients = [shared_state.connect(server.url("session")) for _ in range(count)]
    try:
        logins = []
        for client in clients:

            def window(name: str, limit: int, seconds: float, c=client) -> WindowLimit:  # type: ignore[no-untyped-def]
                return shared_state.SharedWindowLimiter(c, names, name, limit, seconds)

            book = RedisChallengeBook(client, names, ttl, capacity=capacity, per_group=40)
            limits = LoginLimits(3, 5, 900, challenges_per_address_per_minute=20)
            logins.append(Login(sessions, directory, book, limits, outbox, windows=window))
        yield logins, directory
    finally:
        for client in clients:
            await client.aclose()


def user(directory: FakeDirectory, user_id: str) -> UserKeys:
    keys = UserKeys.generate(0)
    directory.keys[user_id] = keys.verify_key
    return keys


async def attempt(
    login: Login, user_id: str, challenge: Challenge, keys: UserKeys, address: str = "1.2.3.4"
) -> str:
    token, _ = await login.sign_in(
        user_id,
        challenge.challenge_id,
        keys.sign_login(user_id, challenge.nonce),
        address=address,
        user_agent="test",
    )
    return token


async def test_a_challenge_issued_by_one_replica_is_redeemed_by_another_once(
    redis_server: RedisServer,
) -> None:
    async with replicas(redis_server) as ((a, b), directory):
        keys = user(directory, "alice")
        challenge = await a.challenge("alice", "1.2.3.4")
        assert await a.pending_challenges() == 1
        results = await asyncio.gather(
            *(attempt(login, "alice", challenge, keys) for login in (a, b, a, b)),
            return_exceptions=True,
        )
        assert sum(isinstance(r, str) for r in results) == 1  # one login, three refusals
        assert all(isinstance(r, (str, Unauthenticated)) for r in results)
        assert await b.pending_challenges() == 0


async def test_the_failure_limit_counts_across_replicas(redis_server: RedisServer) -> None:
    async with replicas(redis_server) as ((a, b), directory):
        user(directory, "alice")
        stranger = UserKeys.generate(0)
        for i in range(3):  # the limit is 3 per (account, address): alternate replicas
            login = (a, b)[i % 2]
            with pytest.raises(Unauthenticated):
                await attempt(login, "alice", await login.challenge("alice", "5.5.5.5"), stranger)
        for login in (a, b):  # the 4th is refused whichever replica sees it
            with pytest.raises(ResourceExhausted, match="this account from your address"):
                await attempt(login, "alice", await login.challenge("alice", "5.5.5.5"), stranger)


async def test_challenge_requests_per_address_are_capped_across_replicas(
    redis_server: RedisServer,
) -> None:
    async with replicas(redis_server) as ((a, b), _):
        for i in range(20):
            await (a, b)[i % 2].challenge("alice", "9.9.9.9")
        for login in (a, b):
            with pytest.raises(ResourceExhausted, match="too many login challenges"):
                await login.challenge("alice", "9.9.9.9")
        await b.challenge("alice", "8.8.8.8")


async def test_a_filling_shared_book_cuts_back_the_groups_holding_most(
    redis_server: RedisServer,
) -> None:
    async with replicas(redis_server, capacity=100) as ((a, b), _):
        books = [login._challenges for login in (a, b)]

        async def issue_until_refused(group: str) -> int:
            issued = 0
            with pytest.raises(ResourceExhausted, match="unanswered login challenges"):  # noqa: PT012
                while True:
                    await books[issued % 2].issue("someone", group)
                    issued += 1
            return issued

        # The memory book's numbers (test_login.py), over two replicas.
        assert [await issue_until_refused(g) for g in "abc"] == [40, 27, 15]
        assert await books[0].count() == 82


async def test_a_challenge_expires_on_redis_clock(redis_server: RedisServer) -> None:
    async with replicas(redis_server, ttl=1) as ((a, b), directory):
        keys = user(directory, "alice")
        challenge = await a.challenge("alice", "1.2.3.4")
        await asyncio.sleep(1.2)
        with pytest.raises(Unauthenticated):
            await attempt(b, "alice", challenge, keys)
        assert await a.pending_challenges() == 0


async def test_redis_holds_no_user_id_or_address(redis_server: RedisServer) -> None:
    async with replicas(redis_server) as ((a, _), directory):
        user(directory, "alice-4c1f")
        stranger = UserKeys.generate(0)
        with pytest.raises(Unauthenticated):
            await attempt(a, "alice-4c1f", await a.challenge("alice-4c1f", "203.0.113.7"), stranger)
        await a.challenge("alice-4c1f", "203.0.113.7")
        with redis_server.admin() as admin:
            keys = list(admin.scan_iter(count=1000))
            memory = b"\n".join(key + (admin.dump(key) or b"") for key in keys)
        assert keys
        for secret in (b"alice-4c1f", b"203.0.113", b"203.0.113.7"):
            assert secret not in memory
