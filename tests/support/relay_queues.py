"""Both relay queue stores, built alike, so one set of relay tests runs against each."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from services.common import shared_state
from services.common.audit_events import AuditSink
from services.common.outbox import MemoryOutbox
from services.relay.model import QueueStore, RelayLimits
from services.relay.queues import MessageQueues
from services.relay.redis_queues import RedisQueues
from services.relay.sealing import RelaySeal
from tests.support.redis import RedisServer, prefix

BACKENDS = ("memory", "redis")
TEST_KEY = "relay store key for tests"


@asynccontextmanager
async def queue_store(
    backend: str,
    limits: RelayLimits,
    audit: AuditSink | None = None,
    clock: Callable[[], float] | None = None,
    server: RedisServer | None = None,
) -> AsyncIterator[QueueStore]:
    """A fresh store: in memory, or in Redis under a key prefix of its own."""
    audit = audit if audit is not None else MemoryOutbox("relay")
    if backend == "memory":
        yield MessageQueues(limits, audit, clock) if clock else MessageQueues(limits, audit)
        return
    assert server is not None, "the redis backend needs the redis_server fixture"
    store = RedisQueues(
        shared_state.connect(server.url("relay")),
        limits,
        audit,
        RelaySeal(TEST_KEY),
        prefix=prefix(),
        clock=clock,
    )
    try:
        yield store
    finally:
        await store.close()
