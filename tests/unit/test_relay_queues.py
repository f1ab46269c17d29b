"""Relay queues: caps, expiry, acknowledgement and idempotent sends, without a network,
against both stores (in memory, and in a private Redis)."""

from __future__ import annotations

import contextlib
import gc
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any, Protocol

import pytest

from services.common.audit_events import AuditSink
from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.outbox import MemoryOutbox
from services.relay.model import MESSAGE_OVERHEAD_BYTES, QueueStore, RelayLimits
from services.relay.queues import MessageQueues
from tests.support.relay_queues import BACKENDS, queue_store
from tests.unit.conftest import FakeClock


class Build(Protocol):
    async def __call__(self, audit: AuditSink | None = None, **limits: Any) -> QueueStore: ...


@pytest.fixture(params=BACKENDS)
async def queues(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[Build]:
    server = request.getfixturevalue("redis_server") if request.param == "redis" else None
    async with contextlib.AsyncExitStack() as stores:

        async def build(audit: AuditSink | None = None, **limits: Any) -> QueueStore:
            return await stores.enter_async_context(
                queue_store(request.param, RelayLimits(**limits), audit, clock, server)
            )

        yield build


async def send(q: QueueStore, body: bytes = b"x", to: str = "bob", ttl: float | None = None) -> str:
    return await send_from(q, "alice", to, body, ttl)


async def send_from(
    q: QueueStore, sender: str, to: str, body: bytes, ttl: float | None = None, cmid: str = ""
) -> str:
    admitted = await q.admit(sender, to, body, ttl)
    return (await q.send(sender, to, body, admitted, cmid)).message_id


async def ids(q: QueueStore, recipient: str = "bob", **options: Any) -> list[str]:
    return [m.message_id for m in await q.pending(recipient, **options)]


async def test_messages_wait_in_order_until_acknowledged(queues: Build) -> None:
    q = await queues()
    first, second = await send(q, b"1"), await send(q, b"2")
    assert await ids(q) == [first, second]
    pending = await q.pending("bob")
    assert [(m.sender_id, bytes(m.body)) for m in pending] == [("alice", b"1"), ("alice", b"2")]
    assert pending[0].seq < pending[1].seq
    assert await ids(q, after=pending[0].seq) == [second]  # a stream's cursor
    assert await q.acknowledge("bob", [first, "unknown"]) == 1
    assert await q.acknowledge("bob", [first]) == 0
    assert await ids(q) == [second]


async def test_acknowledging_wipes_the_stored_body(clock: FakeClock) -> None:
    q = MessageQueues(RelayLimits(), MemoryOutbox("relay"), clock)  # memory only: Redis
    message_id = await send(q, b"secret")  # cannot wipe what it freed (see README)
    message = (await q.pending("bob"))[0]
    await q.acknowledge("bob", [message_id])
    assert bytes(message.body) == b"\x00" * 6


async def test_expired_messages_are_hidden_then_swept(queues: Build, clock: FakeClock) -> None:
    q = await queues()
    await send(q, ttl=1)
    kept = await send(q, ttl=10)
    clock.advance(2)
    assert await ids(q) == [kept]
    assert await q.expire() == 1
    assert (await q.stats()).queued_messages == 1


async def test_the_expiry_schedule_is_compacted_after_acknowledgements(clock: FakeClock) -> None:
    q = MessageQueues(
        RelayLimits(max_queue_messages=10_000, sends_per_minute=10_000, max_sender_messages=10_000),
        MemoryOutbox("relay"),
        clock,
    )
    for recipient in range(3000):  # a mailbox each, each scheduled
        await send_from(q, "alice", f"user{recipient}", b"x")
    for recipient in range(3000):
        await q.acknowledge(f"user{recipient}", await ids(q, f"user{recipient}"))
    await q.expire()
    assert len(q._due) == 0


async def test_per_recipient_count_cap(queues: Build) -> None:
    q = await queues(max_queue_messages=2)
    await send(q)
    await send(q)
    with pytest.raises(ResourceExhausted, match="queue is full"):
        await send(q)
    await send(q, to="carol")  # other recipients are unaffected


async def test_total_cap_counts_bodies_and_overhead(queues: Build) -> None:
    q = await queues(max_total_bytes=3 * (100 + MESSAGE_OVERHEAD_BYTES))
    for to in ("bob", "carol", "dave"):
        await send(q, b"x" * 100, to=to)
    with pytest.raises(ResourceExhausted, match="capacity"):
        await send(q, b"x" * 100, to="erin")
    assert (await q.stats()).queued_bytes == 300


async def test_sender_rate_limit(queues: Build) -> None:
    q = await queues(sends_per_minute=3)
    for _ in range(3):
        await send(q)
    with pytest.raises(ResourceExhausted, match="retry after"):
        await send(q)
    with pytest.raises(ResourceExhausted, match="retry after"):
        await send(q)  # a refused send does not count (it would never end)


@pytest.mark.parametrize(
    ("body", "ttl", "error", "message"),
    [
        (b"", None, InvalidArgument, "body is required"),
        (b"x" * 11, None, ResourceExhausted, "limit is 10"),
        (b"x", 0.0, InvalidArgument, "ttl must be"),
        (b"x", 101.0, InvalidArgument, "ttl must be"),
    ],
)
async def test_bad_sends(
    queues: Build, body: bytes, ttl: float | None, error: type[Exception], message: str
) -> None:
    q = await queues(max_body_bytes=10, max_ttl=100)
    with pytest.raises(error, match=message):
        await q.admit("alice", "bob", body, ttl)


async def test_pending_respects_count_and_byte_budgets(queues: Build) -> None:
    q = await queues()
    for _ in range(5):
        await send(q, b"x" * 1000)
    assert len(await q.pending("bob", limit=2)) == 2
    assert len(await q.pending("bob", max_bytes=2 * (1000 + MESSAGE_OVERHEAD_BYTES))) == 2
    assert len(await q.pending("bob", max_bytes=1)) == 1  # always at least one


async def test_security_events_go_to_the_outbox_once_a_minute_and_name_no_recipient(
    queues: Build,
) -> None:
    outbox = MemoryOutbox("relay")
    q = await queues(outbox, max_queue_messages=1, sends_per_minute=3)
    await send(q)
    for _ in range(3):
        with pytest.raises(ResourceExhausted):
            await send(q)
    events = [(e.action, e.user_id, dict(e.details)) for _, e in outbox.peek(10)]
    assert events == [
        ("capacity_exceeded", "", {"scope": "recipient_queue"}),
        ("rate_limit_exceeded", "alice", {"limit": "relay_sends"}),
    ]


async def test_stats_keep_count_through_sends_acks_expiry_and_watchers(
    queues: Build, clock: FakeClock
) -> None:
    q = await queues()
    first = await send(q, b"a", to="bob")
    await send(q, b"bc", to="bob", ttl=1)
    await send(q, b"d", to="carol")
    watcher = await q.watch("dave")
    stats = await q.stats()
    assert (stats.recipients, stats.subscribers, stats.queued_bytes) == (2, 1, 4)
    await q.acknowledge("carol", await ids(q, "carol"))
    clock.advance(2)
    await q.expire()
    await q.acknowledge("bob", [first])
    q.unwatch("dave", watcher)
    q.unwatch("dave", watcher)  # twice is harmless
    stats = await q.stats()
    assert (stats.queued_messages, stats.recipients, stats.subscribers) == (0, 0, 0)
    assert (stats.queued_bytes, stats.charged_bytes) == (0, 0)


async def send_until_refused(q: QueueStore, sender: str, to: str, body: bytes) -> int:
    sent = 0
    with pytest.raises(ResourceExhausted) as refusal:  # noqa: PT012
        while True:
            await send_from(q, sender, to, body)
            sent += 1
    assert "capacity" not in refusal.value.message  # capped as a sender, not by the total
    return sent


async def test_a_sender_is_capped_in_messages_and_bytes_across_recipients(queues: Build) -> None:
    q = await queues(max_sender_messages=3, max_sender_bytes=10 * 1024)
    for to in ("bob", "carol", "dave"):
        await send_from(q, "alice", to, b"x")
    with pytest.raises(ResourceExhausted, match="too many undelivered messages"):
        await send_from(q, "alice", "erin", b"x")
    await q.acknowledge("bob", await ids(q, "bob"))
    await send_from(q, "alice", "erin", b"x")  # room again once a recipient read one
    body = b"x" * 4000
    assert await send_until_refused(q, "mallory", "bob", body) == 2  # 2 * 4512 <= 10 KiB


async def test_an_honest_sender_still_gets_through_while_an_abuser_is_capped(
    queues: Build,
) -> None:
    # The review's fill: accounts sending large bodies to recipients nobody reads.
    cost = 1024 + MESSAGE_OVERHEAD_BYTES
    q = await queues(
        max_body_bytes=1024,
        max_total_bytes=100 * cost,
        max_sender_bytes=30 * cost,
        sends_per_minute=10_000,
    )
    held = [await send_until_refused(q, f"abuser{i}", f"sink{i}", b"x" * 1024) for i in range(10)]
    assert held[0] == 30  # the per-sender cap
    assert held[2] < held[1] < 30  # past half full, allowances shrink
    assert (await q.stats()).queued_messages < 100  # ten accounts did not fill it
    await send_from(q, "alice", "bob", b"hello bob")


async def test_messages_to_a_recipient_who_never_connected_expire_sooner_until_they_connect(
    queues: Build, clock: FakeClock
) -> None:
    q = await queues(unseen_recipient_ttl=100)
    await send_from(q, "alice", "bob", b"1", ttl=1000)
    await send_from(q, "alice", "carol", b"2", ttl=1000)
    assert [m.expire_time for m in await q.pending("bob")] == [clock.now + 100]
    await q.connected("carol")  # carol fetched: her message gets its full lifetime back
    assert [m.expire_time for m in await q.pending("carol")] == [clock.now + 1000]
    await send_from(q, "alice", "carol", b"3", ttl=1000)
    clock.advance(150)
    assert await q.expire() == 1
    assert await q.pending("bob") == []
    assert [bytes(m.body) for m in await q.pending("carol")] == [b"2", b"3"]
    clock.advance(900)
    assert await q.expire() == 2


async def test_live_streams_are_capped_per_user_and_in_all(queues: Build) -> None:
    q = await queues(max_streams_per_user=2, max_streams=3)
    first = await q.watch("bob")
    await q.watch("bob")
    with pytest.raises(ResourceExhausted, match="2 live subscriptions open"):
        await q.watch("bob")
    await q.watch("carol")
    with pytest.raises(ResourceExhausted, match="too many live subscriptions"):
        await q.watch("dave")
    q.unwatch("bob", first)
    await q.watch("dave")
    assert (await q.stats()).subscribers == 3


async def test_a_repeated_client_message_id_queues_the_message_once(queues: Build) -> None:
    q = await queues()
    first = await send_from(q, "alice", "bob", b"hi", cmid="c-1")
    again = await send_from(q, "alice", "bob", b"hi", cmid="c-1")
    other = await send_from(q, "carol", "bob", b"hi", cmid="c-1")  # another sender's id
    assert again == first
    assert other != first
    assert await ids(q) == [first, other]
    await q.acknowledge("bob", [first])
    assert await send_from(q, "alice", "bob", b"hi", cmid="c-1") == first  # still a retry
    assert await ids(q) == [other]
    assert await send_from(q, "alice", "bob", b"hi") != await send_from(q, "alice", "bob", b"hi")


async def test_an_id_is_honoured_only_exactly_as_given_out_in_this_process(
    clock: FakeClock,
) -> None:
    q = MessageQueues(RelayLimits(), MemoryOutbox("relay"), clock)
    message_id = await send(q, b"one")
    prefix, digits = message_id[:-1], message_id[-1]
    earlier_process = MessageQueues(RelayLimits(), MemoryOutbox("relay"), clock)
    foreign = await send(earlier_process, b"old")
    for alias in (f"{prefix}0{digits}", f"{prefix}+{digits}", f"{prefix} {digits}", foreign):
        assert await q.acknowledge("bob", [alias]) == 0
    assert await q.acknowledge("bob", [message_id]) == 1


async def test_a_queued_message_costs_little_beyond_its_body(clock: FakeClock) -> None:
    """Measured with tracemalloc, not timed: the same count on any machine."""
    q = MessageQueues(
        RelayLimits(max_queue_messages=10_000, max_sender_messages=10_000, sends_per_minute=10**6),
        MemoryOutbox("relay"),
        clock,
    )
    body = bytes(256)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(5000):
            await send_from(q, f"sender{n % 10}", f"user{n % 50}", body)
        gc.collect()
        per_message = (tracemalloc.get_traced_memory()[0] - before) / 5000 - len(body)
    finally:
        tracemalloc.stop()
    assert per_message <= 256
