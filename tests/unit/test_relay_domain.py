"""Relay rules: the order of a send's checks and live delivery, without a network."""

from __future__ import annotations

import asyncio
import contextlib
import logging

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
from services.relay.model import RelayLimits
from services.relay.queues import MessageQueues
from tests.fakes.relay import Directory
from tests.unit.conftest import FakeClock


def relay(clock: FakeClock, directory: Directory, **limits: int) -> tuple[Relay, MessageQueues]:
    queues = MessageQueues(RelayLimits(**limits), MemoryOutbox("relay"), clock)
    return Relay(queues, directory, revalidate_seconds=0.05, fetch_budget_bytes=1 << 20), queues


async def test_a_send_is_admitted_before_the_recipient_is_looked_up(clock: FakeClock) -> None:
    directory = Directory("bob")
    r, queues = relay(clock, directory, sends_per_minute=1)
    await r.send("alice", "bob", b"hi", None)
    with pytest.raises(ResourceExhausted):  # rate limited: identity is not asked
        await r.send("alice", "bob", b"hi", None)
    with pytest.raises(InvalidArgument):
        await r.send("carol", "bob", b"", None)
    assert directory.lookups == 1
    with pytest.raises(NotFound, match="recipient_id"):
        await r.send("dave", "nobody", b"hi", None)
    assert directory.lookups == 2
    assert queues.stats().queued_messages == 1  # nothing queued for the unknown recipient


async def test_fetch_and_acknowledge_check_their_limits(clock: FakeClock) -> None:
    r, _ = relay(clock, Directory("bob"))
    sent = await r.send("alice", "bob", b"hi", None)
    assert [m.message_id for m in r.fetch("bob", 0)] == [sent.message_id]
    with pytest.raises(InvalidArgument, match="max_messages"):
        r.fetch("bob", MAX_FETCH + 1)
    with pytest.raises(InvalidArgument, match="at least one"):
        r.acknowledge("bob", [])
    with pytest.raises(InvalidArgument, match="at most"):
        r.acknowledge("bob", ["x"] * (MAX_ACK_IDS + 1))
    assert r.acknowledge("bob", [sent.message_id]) == 1


async def allowed() -> None:
    return None


async def test_a_subscriber_gets_the_backlog_then_arrivals_each_once(clock: FakeClock) -> None:
    r, queues = relay(clock, Directory("bob"))
    first = await r.send("alice", "bob", b"1", None)
    received: list[str] = []
    stream = r.subscribe("bob", allowed)
    async with contextlib.aclosing(stream):
        received.append((await anext(stream)).message_id)
        second = await r.send("alice", "bob", b"2", None)
        received.append((await anext(stream)).message_id)
        r.acknowledge("bob", [first.message_id])
        third = await r.send("alice", "bob", b"3", None)  # unacknowledged second: not again
        received.append((await anext(stream)).message_id)
        assert queues.stats().subscribers == 1
    assert received == [first.message_id, second.message_id, third.message_id]
    assert queues.stats().subscribers == 0  # closing the stream released its watch
    again = r.subscribe("bob", allowed)
    async with contextlib.aclosing(again):  # a new stream gets what is unacknowledged
        assert (await anext(again)).message_id == second.message_id


async def test_a_revoked_token_or_a_shutdown_ends_the_stream(clock: FakeClock) -> None:
    r, queues = relay(clock, Directory("bob"))

    async def revoked() -> None:
        raise Unauthenticated("revoked")

    with pytest.raises(Unauthenticated):
        await anext(r.subscribe("bob", revoked))  # rechecked every 0.05 s
    waiting = asyncio.ensure_future(anext(r.subscribe("bob", allowed)))
    await asyncio.sleep(0.01)
    queues.closing.set()
    with pytest.raises(Unavailable, match="subscribe again"):
        await waiting
    assert queues.stats().subscribers == 0


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
