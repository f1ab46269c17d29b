"""Identity's limits shared by replicas through Redis: two `Identity`s (and two
`Factors`) on one private Redis stand for two identity processes, each with its own
Redis client and event loop thread, the accounts in one store as a shared database
would hold them. The rules run in worker threads, as the servicer runs them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import pytest

from services.client.keys import UserKeys
from services.common import shared_state
from services.common.audit_events import AuditRecord
from services.common.errors import ResourceExhausted, Unauthenticated, Unavailable
from services.common.ratelimit import CounterFactory
from services.identity import totp
from services.identity.domain import Identity, IdentityLimits
from services.identity.factors import FactorLimits, Factors
from services.identity.keys import SignedKey
from services.identity.model import NewUser
from services.identity.passwords import HashParameters, PasswordHasher
from tests.fakes.identity import MemoryFactorStore, MemoryIdentityStore, RecordingRevoker
from tests.fakes.outbox import RecordingAuditSink
from tests.support.redis import RedisServer, prefix
from tests.support.stack import free_port
from tests.unit.conftest import FakeClock, registration

T = TypeVar("T")
HASHER = PasswordHasher(HashParameters(time_cost=1, memory_kib=1024))
PASSWORD = "lantern orbit velvet quarry"


@contextlib.asynccontextmanager
async def shared_windows(
    server: RedisServer, count: int = 2
) -> AsyncIterator[list[CounterFactory]]:
    """One window factory per replica: its own client, the same key names."""
    names = shared_state.KeyNames(b"k" * 32, prefix())
    clients = [shared_state.connect(server.url("identity")) for _ in range(count)]
    loop = asyncio.get_running_loop()
    try:
        yield [shared_state.thread_counters(client, names, loop) for client in clients]
    finally:
        for client in clients:
            await client.aclose()


async def in_thread(call: Callable[..., T], *args: object) -> T:
    return await asyncio.to_thread(call, *args)


def factor_store() -> MemoryFactorStore:
    store = MemoryFactorStore()
    key = SignedKey(1, b"s" * 32, b"g" * 64)
    alice = NewUser("alice", "Alice Liddell", {}, b"i" * 32, b"v" * 32, key, key, [], 0.0)
    store.users.add_user(alice, AuditRecord("user_registered", "alice"))
    return store


async def test_wrong_codes_are_counted_across_replicas(
    redis_server: RedisServer, clock: FakeClock
) -> None:
    store = factor_store()
    limits = FactorLimits(code_failures_per_account=3)
    async with shared_windows(redis_server) as windows:
        a, b = (
            Factors(store, store.users, HASHER, RecordingAuditSink(), clock, limits, windows=w)
            for w in windows
        )
        secret = (await in_thread(a.begin_totp, "alice")).secret
        await in_thread(a.activate_totp, "alice", totp.code_at(secret, clock.now))
        wrong = "123456" if totp.code_at(secret, clock.now) != "123456" else "654321"
        for replica in (a, b, a):
            with pytest.raises(Unauthenticated):
                await in_thread(replica.verify_second_factor, "alice", wrong, "")
        # Each replica alone saw fewer than three; the fourth is refused on either, even
        # with the right code.
        for replica in (b, a):
            with pytest.raises(ResourceExhausted, match="too many wrong codes"):
                await in_thread(
                    replica.verify_second_factor, "alice", totp.code_at(secret, clock.now + 30), ""
                )


async def test_the_password_budget_of_unknown_ids_is_counted_across_replicas(
    redis_server: RedisServer, clock: FakeClock
) -> None:
    store = factor_store()
    limits = FactorLimits(password_budget=4)
    async with shared_windows(redis_server) as windows:
        a, b = (
            Factors(store, store.users, HASHER, RecordingAuditSink(), clock, limits, windows=w)
            for w in windows
        )
        for replica in (a, b, a, b):
            with pytest.raises(Unauthenticated):
                await in_thread(replica.verify_password, "nobody", PASSWORD, "", "")
        with pytest.raises(ResourceExhausted):
            await in_thread(a.verify_password, "nobody", PASSWORD, "", "")


async def test_registrations_bundles_and_prekeys_are_counted_across_replicas(
    redis_server: RedisServer, clock: FakeClock
) -> None:
    store = MemoryIdentityStore()
    limits = IdentityLimits(
        registrations_per_minute=2, bundles_per_minute=4, prekeys_per_target_per_hour=2
    )
    async with shared_windows(redis_server) as windows:
        a, b = (Identity(store, RecordingRevoker(), clock, limits, windows=w) for w in windows)
        await in_thread(a.register, registration("victim", UserKeys.generate(20)), "10.0.0.1")
        await in_thread(b.register, registration("other", UserKeys.generate(0)), "10.0.0.1")
        with pytest.raises(ResourceExhausted, match="registrations from your address"):
            await in_thread(a.register, registration("third", UserKeys.generate(0)), "10.0.0.1")

        served = [await in_thread(r.bundle, "victim", "mallory") for r in (a, b, a, b)]
        # Two fetches of one user's bundle by one caller take a one-time prekey, whichever
        # replica serves them; the pool is spent no faster with two replicas than one.
        assert [x.one_time_prekey is not None for x in served] == [True, True, False, False]
        assert await in_thread(a.prekey_count, "victim") == 18
        with pytest.raises(ResourceExhausted, match="retry after"):
            await in_thread(a.bundle, "victim", "mallory")


async def test_a_shared_limit_never_waits_for_its_own_loop(redis_server: RedisServer) -> None:
    async with shared_windows(redis_server, count=1) as (windows,):
        window = windows("calls", 1, 60.0)
        # Called on the loop's own thread it would wait forever for the loop: it says so.
        with pytest.raises(RuntimeError, match="event loop's thread"):
            window.acquire("k")
        assert await in_thread(window.acquire, "k") is None
        assert await in_thread(window.acquire, "k") is not None


async def test_an_unreachable_redis_refuses_with_unavailable() -> None:
    client = shared_state.connect(f"redis://identity:x@127.0.0.1:{free_port()}/0")
    names = shared_state.KeyNames(b"k" * 32, prefix())
    window = shared_state.thread_counters(client, names, asyncio.get_running_loop())(
        "calls", 1, 60.0
    )
    try:
        with pytest.raises(Unavailable, match="unreachable"):
            await in_thread(window.acquire, "k")
    finally:
        await client.aclose()
