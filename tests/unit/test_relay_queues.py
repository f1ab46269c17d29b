"""Relay queues: caps, expiry, acknowledgement and wiping, without a network."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.outbox import MemoryOutbox
from services.relay.model import MESSAGE_OVERHEAD_BYTES, RelayLimits
from services.relay.queues import MessageQueues
from tests.unit.conftest import FakeClock


def queues(clock: FakeClock, **limits: int | float) -> MessageQueues:
    return MessageQueues(RelayLimits(**limits), MemoryOutbox("relay"), clock)  # type: ignore[arg-type]


def send(q: MessageQueues, body: bytes = b"x", to: str = "bob", ttl: float | None = None) -> str:
    admitted = q.admit("alice", to, body, ttl)
    return q.send("alice", to, body, admitted).message_id


def test_messages_wait_in_order_until_acknowledged(clock: FakeClock) -> None:
    q = queues(clock)
    first, second = send(q, b"1"), send(q, b"2")
    assert [m.message_id for m in q.pending("bob")] == [first, second]
    assert q.acknowledge("bob", [first, "unknown"]) == 1
    assert q.acknowledge("bob", [first]) == 0
    assert [m.message_id for m in q.pending("bob")] == [second]


def test_acknowledging_wipes_the_stored_body(clock: FakeClock) -> None:
    q = queues(clock)
    message_id = send(q, b"secret")
    message = q.pending("bob")[0]
    q.acknowledge("bob", [message_id])
    assert bytes(message.body) == b"\x00" * 6


def test_expired_messages_are_hidden_then_swept(clock: FakeClock) -> None:
    q = queues(clock)
    send(q, ttl=1)
    kept = send(q, ttl=10)
    clock.advance(2)
    assert [m.message_id for m in q.pending("bob")] == [kept]
    assert q.expire() == 1
    assert q.stats().queued_messages == 1


def test_the_expiry_heap_is_compacted_after_acknowledgements(clock: FakeClock) -> None:
    q = queues(
        clock, max_queue_messages=10_000, sends_per_minute=10_000, max_sender_messages=10_000
    )
    ids = [send(q) for _ in range(3000)]
    q.acknowledge("bob", ids)
    q.expire()
    assert len(q._expiry) == 0


def test_per_recipient_count_cap(clock: FakeClock) -> None:
    q = queues(clock, max_queue_messages=2)
    send(q)
    send(q)
    with pytest.raises(ResourceExhausted, match="queue is full"):
        send(q)
    send(q, to="carol")  # other recipients are unaffected


def test_total_cap_counts_bodies_and_overhead(clock: FakeClock) -> None:
    q = queues(clock, max_total_bytes=3 * (100 + MESSAGE_OVERHEAD_BYTES))
    for to in ("bob", "carol", "dave"):
        send(q, b"x" * 100, to=to)
    with pytest.raises(ResourceExhausted, match="capacity"):
        send(q, b"x" * 100, to="erin")
    assert q.stats().queued_bytes == 300


def test_sender_rate_limit(clock: FakeClock) -> None:
    q = queues(clock, sends_per_minute=3)
    for _ in range(3):
        send(q)
    with pytest.raises(ResourceExhausted, match="retry after"):
        send(q)


@pytest.mark.parametrize(
    ("body", "ttl", "error", "message"),
    [
        (b"", None, InvalidArgument, "body is required"),
        (b"x" * 11, None, ResourceExhausted, "limit is 10"),
        (b"x", 0.0, InvalidArgument, "ttl must be"),
        (b"x", 101.0, InvalidArgument, "ttl must be"),
    ],
)
def test_bad_sends(
    clock: FakeClock, body: bytes, ttl: float | None, error: type[Exception], message: str
) -> None:
    q = queues(clock, max_body_bytes=10, max_ttl=100)
    with pytest.raises(error, match=message):
        q.admit("alice", "bob", body, ttl)


def test_pending_respects_count_and_byte_budgets(clock: FakeClock) -> None:
    q = queues(clock)
    for _ in range(5):
        send(q, b"x" * 1000)
    assert len(q.pending("bob", limit=2)) == 2
    assert len(q.pending("bob", max_bytes=2 * (1000 + MESSAGE_OVERHEAD_BYTES))) == 2
    assert len(q.pending("bob", max_bytes=1)) == 1  # always at least one


def test_security_events_go_to_the_outbox_once_a_minute_and_name_no_recipient(
    clock: FakeClock,
) -> None:
    outbox = MemoryOutbox("relay")
    q = MessageQueues(RelayLimits(max_queue_messages=1, sends_per_minute=3), outbox, clock)
    send(q)
    for _ in range(3):
        with pytest.raises(ResourceExhausted):
            send(q)
    events = [(e.action, e.user_id, dict(e.details)) for _, e in outbox.peek(10)]
    assert events == [
        ("capacity_exceeded", "", {"scope": "recipient_queue"}),
        ("rate_limit_exceeded", "alice", {"limit": "relay_sends"}),
    ]


async def test_stats_keep_count_through_sends_acks_expiry_and_watchers(clock: FakeClock) -> None:
    q = queues(clock)
    first = send(q, b"a", to="bob")
    send(q, b"bc", to="bob", ttl=1)
    send(q, b"d", to="carol")
    watcher = q.watch("dave")
    assert (q.stats().recipients, q.stats().subscribers, q.stats().queued_bytes) == (2, 1, 4)
    q.acknowledge("carol", [m.message_id for m in q.pending("carol")])
    clock.advance(2)
    q.expire()
    q.acknowledge("bob", [first])
    q.unwatch("dave", watcher)
    q.unwatch("dave", watcher)  # twice is harmless
    stats = q.stats()
    assert (stats.queued_messages, stats.recipients, stats.subscribers) == (0, 0, 0)


def send_from(q: MessageQueues, sender: str, to: str, body: bytes, ttl: float | None = None) -> str:
    return q.send(sender, to, body, q.admit(sender, to, body, ttl)).message_id


def send_until_refused(q: MessageQueues, sender: str, to: str, body: bytes) -> int:
    sent = 0
    with pytest.raises(ResourceExhausted) as refusal:  # noqa: PT012
        while True:
            send_from(q, sender, to, body)
            sent += 1
    assert "capacity" not in refusal.value.message  # capped as a sender, not by the total
    return sent


def test_a_sender_is_capped_in_messages_and_bytes_across_recipients(clock: FakeClock) -> None:
    q = queues(clock, max_sender_messages=3, max_sender_bytes=10 * 1024)
    for to in ("bob", "carol", "dave"):
        send_from(q, "alice", to, b"x")
    with pytest.raises(ResourceExhausted, match="too many undelivered messages"):
        send_from(q, "alice", "erin", b"x")
    q.acknowledge("bob", [m.message_id for m in q.pending("bob")])
    send_from(q, "alice", "erin", b"x")  # room again once a recipient read one
    body = b"x" * 4000
    assert send_until_refused(q, "mallory", "bob", body) == 2  # 2 * 4512 <= 10 KiB < 3 * 4512


def test_an_honest_sender_still_gets_through_while_an_abuser_is_capped(clock: FakeClock) -> None:
    # The review's fill: accounts sending large bodies to recipients nobody reads.
    cost = 1024 + MESSAGE_OVERHEAD_BYTES
    q = queues(
        clock,
        max_body_bytes=1024,
        max_total_bytes=100 * cost,
        max_sender_bytes=30 * cost,
        sends_per_minute=10_000,
    )
    held = [send_until_refused(q, f"abuser{i}", f"sink{i}", b"x" * 1024) for i in range(10)]
    assert held[0] == 30  # the per-sender cap
    assert held[2] < held[1] < 30  # past half full, allowances shrink
    assert q.stats().queued_messages < 100  # ten accounts did not fill it
    send_from(q, "alice", "bob", b"hello bob")


def test_messages_to_a_recipient_who_never_connected_expire_sooner_until_they_connect(
    clock: FakeClock,
) -> None:
    q = queues(clock, unseen_recipient_ttl=100)
    send_from(q, "alice", "bob", b"1", ttl=1000)
    send_from(q, "alice", "carol", b"2", ttl=1000)
    assert [m.expire_time for m in q.pending("bob")] == [clock.now + 100]
    q.connected("carol")  # carol fetched: her message gets its full lifetime back
    assert [m.expire_time for m in q.pending("carol")] == [clock.now + 1000]
    send_from(q, "alice", "carol", b"3", ttl=1000)
    clock.advance(150)
    assert q.expire() == 1
    assert q.pending("bob") == []
    assert [bytes(m.body) for m in q.pending("carol")] == [b"2", b"3"]
    clock.advance(900)
    assert q.expire() == 2


def test_live_streams_are_capped_per_user_and_in_all(clock: FakeClock) -> None:
    q = queues(clock, max_streams_per_user=2, max_streams=3)
    first = q.watch("bob")
    q.watch("bob")
    with pytest.raises(ResourceExhausted, match="2 live subscriptions open"):
        q.watch("bob")
    q.watch("carol")
    with pytest.raises(ResourceExhausted, match="too many live subscriptions"):
        q.watch("dave")
    q.unwatch("bob", first)
    q.watch("dave")
    assert q.stats().subscribers == 3
