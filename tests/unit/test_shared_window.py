"""The sliding window shared through Redis (services.common.shared_state), against a
private Redis: what a batch of events counts."""

from __future__ import annotations

from services.common import shared_state
from services.common.shared_state import KeyNames, SharedWindowLimiter
from tests.support.redis import RedisServer, prefix
from tests.unit.conftest import FakeClock


async def test_acquire_many_counts_each_event_as_acquire_would(
    redis_server: RedisServer, clock: FakeClock
) -> None:
    client = shared_state.connect(redis_server.url("relay"))
    limiter = SharedWindowLimiter(client, KeyNames(b"k", prefix()), "sends", 3, 60.0, clock=clock)
    try:
        assert await limiter.acquire_many("alice", 2) == [None, None]
        first, *refused = await limiter.acquire_many("alice", 3)
        assert first is None
        assert refused == [60.0, 60.0]  # the oldest leaves the window in a minute
        assert await limiter.acquire("alice") == 60.0  # the refused ones were not recorded
        assert await limiter.acquire_many("bob", 1) == [None]  # each key counts alone
        clock.advance(61)
        assert await limiter.acquire_many("alice", 3) == [None, None, None]

        # Redis lost its scripts (a restart): the batch loads it and still counts each.
        with redis_server.admin() as admin:
            admin.script_flush()
        assert await limiter.acquire_many("carol", 2) == [None, None]
        assert await limiter.acquire("carol") is None
        assert await limiter.acquire("carol") == 60.0
    finally:
        await client.aclose()
