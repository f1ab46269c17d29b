"""Relay rules: the order of a send's checks and live delivery, without a network, on
both queue stores; and what only Redis can show: replicas sharing the queues."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

import pytest

from services.common import metrics
from services.common.audit_events import AuditRecord
from services.common.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from services.common.outbox import MemoryOutbox
from services.relay.domain import MAX_ACK_IDS, MAX_FETCH, Relay
from services.relay.model import QueueStore, RelayLimits
from tests.fakes.relay import Directory
from tests.support.redis import RedisServer, prefix
from tests.support.relay_queues import BACKENDS, queue_store
from tests.unit.conftest import FakeClock


class Build(Protocol):
    async def __call__(self, directory: Directory, **limits: Any) -> tuple[Relay, QueueStore]: ...


def domain(queues: QueueStore, directory: Directory, revalidate: float = 0.05) -> Relay:
    return Relay(queues, directory, revalidate_seconds=revalidate, fetch_budget_bytes=1 << 20)


@pytest.fixture(params=BACKENDS)
async def relay(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[Build]:
    server = request.getfixturevalue("redis_server") if request.param == "redis" else None
    async with contextlib.AsyncExitStack() as stores:

        async def build(directory: Directory, **limits: Any) -> tuple[Relay, QueueStore]:
            queues = await stores.enter_async_context(
                queue_store(request.param, RelayLimits(**limits), None, clock, server)
            )
            return domain(queues, directory), queues

        yield build


async def test_a_send_is_admitted_before_the_recipient_is_looked_up(relay: Build) -> None:
    directory = Directory("bob")
    r, queues = await relay(directory, sends_per_minute=1)
    await r.send("alice", "bob", b"hi", None)
    with pytest.raises(ResourceExhausted):  # rate limited: identity is not asked
        await r.send("alice", "bob", b"hi", None)
    with pytest.raises(InvalidArgument):
        await r.send("carol", "bob", b"", None)
    assert directory.lookups == 1
    with pytest.raises(NotFound, match="recipient_id"):
        await r.send("dave", "nobody", b"hi", None)
    assert directory.lookups == 2
    assert (await queues.stats()).queued_messages == 1  # nothing queued for the unknown


async def test_fetch_and_acknowledge_check_their_limits(relay: Build) -> None:
    r, _ = await relay(Directory("bob"))
    sent = await r.send("alice", "bob", b"hi", None)
    assert [m.message_id for m in await r.fetch("bob", 0)] == [sent.message_id]
    with pytest.raises(InvalidArgument, match="max_messages"):
        await r.fetch("bob", MAX_FETCH + 1)
    with pytest.raises(InvalidArgument, match="at least one"):
        await r.acknowledge("bob", [])
    with pytest.raises(InvalidArgument, match="at most"):
        await r.acknowledge("bob", ["x"] * (MAX_ACK_IDS + 1))
    assert await r.acknowledge("bob", [sent.message_id]) == 1
    with pytest.raises(InvalidArgument, match="client_message_id"):
        await r.send("alice", "bob", b"hi", None, "x" * 65)


async def allowed() -> None:
    return None


async def test_a_subscriber_gets_the_backlog_then_arrivals_each_once(relay: Build) -> None:
    r, queues = await relay(Directory("bob"))
    first = await r.send("alice", "bob", b"1", None)
    received: list[str] = []
    stream = r.subscribe("bob", allowed)
    async with contextlib.aclosing(stream):
        received.append((await anext(stream)).message_id)
        second = await r.send("alice", "bob", b"2", None)
        received.append((await anext(stream)).message_id)
        await r.acknowledge("bob", [first.message_id])
        third = await r.send("alice", "bob", b"3", None)  # unacknowledged second: not again
        received.append((await anext(stream)).message_id)
        assert (await queues.stats()).subscribers == 1
    assert received == [first.message_id, second.message_id, third.message_id]
    assert (await queues.stats()).subscribers == 0  # closing the stream released its watch
    again = r.subscribe("bob", allowed)
    async with contextlib.aclosing(again):  # a new stream gets what is unacknowledged
        assert (await anext(again)).message_id == second.message_id


async def test_a_revoked_token_or_a_shutdown_ends_the_stream(relay: Build) -> None:
    r, queues = await relay(Directory("bob"))

    async def revoked() -> None:
        raise Unauthenticated("revoked")

    with pytest.raises(Unauthenticated):
        await anext(r.subscribe("bob", revoked))  # rechecked every 0.05 s
    waiting = asyncio.ensure_future(anext(r.subscribe("bob", allowed)))
    await asyncio.sleep(0.05)
    queues.closing.set()
    with pytest.raises(Unavailable, match="subscribe again"):
        await waiting
    assert (await queues.stats()).subscribers == 0


# --- replicas: two stores on one Redis are two relay processes ------------------------


@contextlib.asynccontextmanager
async def replicas(server: RedisServer, count: int, **limits: Any) -> AsyncIterator[list[Relay]]:
    shared = prefix()
    async with contextlib.AsyncExitStack() as stack:
        stores = []
        for _ in range(count):
            store = await stack.enter_async_context(
                queue_store("redis", RelayLimits(**limits), None, None, server)
            )
            store._prefix = shared  # type: ignore[attr-defined]
            store._names.prefix = shared  # type: ignore[attr-defined]
            stores.append(store)
        # Streams re-check their token rarely here, so every wakeup seen is a push.
        yield [domain(store, Directory("bob"), revalidate=60) for store in stores]


async def test_a_message_sent_through_one_replica_reaches_a_stream_on_another_at_once(
    redis_server: RedisServer,
) -> None:
    async with replicas(redis_server, 2) as (a, b):
        stream = b.subscribe("bob", allowed)
        async with contextlib.aclosing(stream):
            first = await a.send("alice", "bob", b"1", None)
            assert (await asyncio.wait_for(anext(stream), 1)).message_id == first.message_id
            loop = asyncio.get_running_loop()
            started = loop.time()
            second = await a.send("alice", "bob", b"2", None)
            got = await asyncio.wait_for(anext(stream), 1)
            assert (got.message_id, got.sender_id, bytes(got.body)) == (
                second.message_id, "alice", b"2",
            )  # fmt: skip
            assert loop.time() - started < 0.25  # pushed, not polled (revalidation: 0.05 s)


async def test_acknowledgements_through_two_replicas_delete_each_message_once(
    redis_server: RedisServer,
) -> None:
    async with replicas(redis_server, 2, max_queue_messages=2000, sends_per_minute=5000) as (a, b):
        sent = [(await a.send("alice", "bob", b"x", None)).message_id for _ in range(200)]
        counts = await asyncio.gather(
            *(replica.acknowledge("bob", [m]) for m in sent for replica in (a, b))
        )
        assert sum(counts) == 200
        assert (await a.stats()).queued_messages == 0


async def test_a_stream_survives_a_lost_redis_connection_without_loss_or_duplicates(
    redis_server: RedisServer,
) -> None:
    async with replicas(redis_server, 2) as (a, b):
        stream = b.subscribe("bob", allowed)
        async with contextlib.aclosing(stream):
            first = await a.send("alice", "bob", b"1", None)
            assert (await asyncio.wait_for(anext(stream), 1)).message_id == first.message_id
            with redis_server.admin() as admin:  # cut every pub/sub connection
                admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            sent = [(await a.send("alice", "bob", bytes([i]), None)).message_id for i in range(5)]
            got = [(await asyncio.wait_for(anext(stream), 5)).message_id for _ in range(5)]
            assert got == sent  # in order, each once: sent while cut, read after reconnecting
            later = await a.send("alice", "bob", b"later", None)
            assert (await asyncio.wait_for(anext(stream), 2)).message_id == later.message_id


def test_a_full_memory_outbox_counts_and_logs_what_it_drops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outbox = MemoryOutbox("relay", capacity=2)
    before = metrics.AUDIT_DROPPED._value.get()
    with caplog.at_level(logging.ERROR, logger="services.common.outbox"):
        for _ in range(5):
            outbox.record(AuditRecord("auth_failed", "", {"ip": "10.0.0.1"}))
        assert (outbox.backlog(), outbox.dropped) == (2, 3)
        assert metrics.AUDIT_DROPPED._value.get() - before == 3
        assert [r.getMessage() for r in caplog.records] == [
            "audit outbox full: dropping audit events until the audit service accepts the backlog"
        ]  # once per episode, not once per event
        outbox.remove([row_id for row_id, _ in outbox.peek(2)])  # shipped: room again
    assert "room again" in caplog.records[-1].getMessage()
    assert caplog.records[-1].fields == {"dropped": 3, "total": 3}  # type: ignore[attr-defined]
