"""Relay memory per queued message, beyond its body, measured with tracemalloc."""

from __future__ import annotations

import gc
import tracemalloc

from services.common.outbox import MemoryOutbox
from services.relay.model import RelayLimits
from services.relay.queues import MessageQueues

BODY = bytes(256)


async def overhead_per_message(count: int = 100_000, recipients: int = 1000) -> float:
    limits = RelayLimits(
        max_queue_messages=count, max_queue_bytes=2**40, max_total_bytes=2**40,
        sends_per_minute=2**31,
    )  # fmt: skip
    queues = MessageQueues(limits, MemoryOutbox("relay"))
    # In the service a sender's id is one string per cached token, and a recipient's id
    # arrives fresh with every request; mimic both.
    senders = [f"sender{i}" for i in range(100)]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(count):
        ttl = await queues.admit(senders[i % 100], f"user{i % recipients}", BODY, None)
        await queues.send(senders[i % 100], f"user{i % recipients}", BODY, ttl)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / count - len(BODY)
