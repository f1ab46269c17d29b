"""Live push across relay replicas (services.relay.redis_push), against a private Redis:
what the relay-level tests cannot time, such as streams that arrive while the replica's
pub/sub connection is still being made."""

from __future__ import annotations

import asyncio

from services.common import shared_state
from services.relay.redis_push import PushListener
from tests.support.redis import RedisServer, prefix


async def test_streams_that_come_while_the_listener_connects_are_subscribed_too(
    redis_server: RedisServer,
) -> None:
    # A fresh replica (or one reconnecting) with several streams opening at once: the
    # first starts the connection, the others come before it is up. Each must be
    # confirmed and pushed to, not left waiting for a confirmation until UNAVAILABLE.
    client = shared_state.connect(redis_server.url("relay"))
    listener = PushListener(client)
    channels = [f"{prefix()}q{i}" for i in range(4)]
    wakeups = [asyncio.Event() for _ in channels]
    try:
        first = asyncio.create_task(listener.add(channels[0], wakeups[0]))
        await asyncio.sleep(0)  # the first add starts the listener
        await asyncio.sleep(0)  # which begins to connect
        rest = [
            asyncio.create_task(listener.add(channel, wakeup))
            for channel, wakeup in zip(channels[1:], wakeups[1:], strict=True)
        ]
        await asyncio.sleep(0)
        assert not listener._connected.is_set(), "the others must come while it connects"
        await asyncio.wait_for(asyncio.gather(first, *rest), 2)
        for wakeup in wakeups:
            wakeup.clear()  # a confirmation wakes its streams too
        for channel in channels:
            await client.spublish(channel, "1")
        await asyncio.wait_for(asyncio.gather(*(wakeup.wait() for wakeup in wakeups)), 2)
    finally:
        await listener.close()
        await client.aclose()
