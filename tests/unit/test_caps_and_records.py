"""What the mutation run found unguarded in the relay's caps and the session records:
per-recipient byte accounting, the audit events and retry hints of capacity refusals,
and the address and user agent a session (and a login) keeps."""

from __future__ import annotations

import pytest

from services.client.keys import UserKeys
from services.common.errors import ResourceExhausted
from services.common.outbox import MemoryOutbox
from services.relay.model import MESSAGE_OVERHEAD_BYTES, RelayLimits
from services.relay.queues import MessageQueues
from services.session.login import ChallengeBook, Login, LoginLimits
from services.session.sessions import SessionPolicy, Sessions
from tests.fakes.directory import FakeDirectory
from tests.fakes.outbox import RecordingAuditSink
from tests.fakes.session import MemorySessionStore
from tests.unit.conftest import FakeClock

BODY = b"x" * 100
COST = len(BODY) + MESSAGE_OVERHEAD_BYTES


def relay(clock: FakeClock, **limits: int) -> tuple[MessageQueues, MemoryOutbox]:
    outbox = MemoryOutbox("relay")
    return MessageQueues(RelayLimits(**limits), outbox, clock), outbox


async def send(q: MessageQueues, sender: str = "alice", to: str = "bob") -> str:
    ttl = await q.admit(sender, to, BODY, None)
    return (await q.send(sender, to, BODY, ttl)).message_id


def capacity_events(outbox: MemoryOutbox) -> list[tuple[str, dict[str, str]]]:
    return [
        (event.user_id, dict(event.details))
        for _, event in outbox.peek(100)
        if event.action == "capacity_exceeded"
    ]


async def test_a_recipients_queue_holds_exactly_its_bytes_and_not_one_message_more(
    clock: FakeClock,
) -> None:
    q, outbox = relay(clock, max_queue_bytes=3 * COST)
    for _ in range(3):
        await send(q)  # exactly full is allowed
    with pytest.raises(ResourceExhausted, match="queue is full"):
        await send(q)
    assert (await q.stats()).queued_bytes == 3 * len(BODY)
    await send(q, to="carol")  # other recipients are unaffected
    assert capacity_events(outbox) == [("", {"scope": "recipient_queue"})]
    await q.acknowledge("bob", [m.message_id for m in (await q.pending("bob"))[:1]])
    await send(q)  # acknowledging makes room again


async def test_a_full_relay_says_so_in_the_audit_log_and_when_to_retry(
    clock: FakeClock,
) -> None:
    q, outbox = relay(clock, max_total_bytes=2 * COST)
    await send(q, to="bob")
    await send(q, to="carol")
    with pytest.raises(ResourceExhausted, match="at capacity") as refused:
        await send(q, to="dave")
    assert refused.value.retry_after == 30
    assert capacity_events(outbox) == [("", {"scope": "relay_total"})]


async def test_a_sender_over_its_share_is_named_in_the_audit_event(clock: FakeClock) -> None:
    q, outbox = relay(clock, max_sender_messages=2)
    await send(q, to="bob")
    await send(q, to="carol")
    with pytest.raises(ResourceExhausted, match="too many undelivered") as refused:
        await send(q, to="dave")
    assert refused.value.retry_after == 60
    assert capacity_events(outbox) == [("alice", {"scope": "sender"})]


def test_a_session_keeps_the_address_and_user_agent_it_was_created_with(
    clock: FakeClock,
) -> None:
    sessions = Sessions(MemorySessionStore(), SessionPolicy(), clock)
    token, record = sessions.create("alice", "203.0.113.9", "Agent/1.0")
    assert (record.ip_address, record.user_agent) == ("203.0.113.9", "Agent/1.0")
    (listed,) = sessions.list("alice").sessions
    assert (listed.ip_address, listed.user_agent, listed.session_id) == (
        "203.0.113.9",
        "Agent/1.0",
        record.session_id,
    )
    assert sessions.validate(token).session_id == record.session_id


async def test_a_login_records_the_address_and_user_agent_it_came_with(clock: FakeClock) -> None:
    directory = FakeDirectory()
    keys = UserKeys.generate(0)
    directory.keys["alice"] = keys.verify_key
    sessions = Sessions(MemorySessionStore(), SessionPolicy(), clock)
    login = Login(
        sessions,
        directory,
        ChallengeBook(ttl=60, clock=clock),
        LoginLimits(3, 5, 900, challenges_per_address_per_minute=20),
        RecordingAuditSink(),
        clock,
    )
    challenge = await login.challenge("alice", "198.51.100.7")
    signature = keys.sign_login("alice", challenge.nonce)
    await login.sign_in(
        "alice", challenge.challenge_id, signature, address="198.51.100.7", user_agent="UA/2"
    )
    (listed,) = sessions.list("alice").sessions
    assert (listed.ip_address, listed.user_agent) == ("198.51.100.7", "UA/2")
