"""The relay against real identity, session and relay processes."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from securemsg.relay.v1 import relay_admin_service_pb2 as admin_pb
from securemsg.relay.v1 import relay_admin_service_pb2_grpc as admin_grpc
from securemsg.relay.v1 import relay_service_pb2 as pb
from securemsg.relay.v1 import relay_service_pb2_grpc as pb_grpc
from securemsg.session.v1 import session_service_pb2 as session_pb

from services.client.sdk import UserClient
from tests.support.redis import relay_env
from tests.support.stack import Stack
from tests.support.users import bearer, details, new_user, user_client

FAST = {
    "RELAY_SWEEP_INTERVAL_SECONDS": "0.2",
    "RELAY_STREAM_REVALIDATE_SECONDS": "0.5",
}


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> dict[str, str]:
    """Where the relay keeps its queues: its own memory, or the test run's Redis."""
    if request.param == "memory":
        return {}
    return relay_env(request.getfixturevalue("redis_server"))


def start(tmp_path: Path, backend: dict[str, str], **relay_env: str) -> Stack:
    stack = Stack(
        tmp_path,
        ("identity", "session", "relay"),
        extra_env={"relay": {**FAST, **backend, **relay_env}},
    )
    stack.start()
    return stack


@pytest.fixture
def relay_stack(tmp_path: Path, backend: dict[str, str]) -> Iterator[Stack]:
    stack = start(tmp_path, backend)
    yield stack
    stack.stop()


class Person:
    """A logged-in user with a relay stub."""

    def __init__(self, stack: Stack, client: UserClient, user_id: str) -> None:
        self.user_id = user_id
        self.keys = new_user(client, user_id)
        self.token = client.login(user_id, self.keys)
        self.channel = stack.channel("relay")
        self.relay = pb_grpc.RelayServiceStub(self.channel)

    def send(self, to: str, body: bytes, ttl: float | None = None) -> pb.SendMessageResponse:
        request = pb.SendMessageRequest(recipient_id=to, body=body)
        if ttl is not None:
            request.ttl.CopyFrom(Duration(seconds=int(ttl), nanos=int((ttl % 1) * 1e9)))
        return self.relay.SendMessage(request, metadata=bearer(self.token), timeout=10)

    def fetch(self) -> list[pb.Envelope]:
        reply = self.relay.FetchMessages(
            pb.FetchMessagesRequest(), metadata=bearer(self.token), timeout=10
        )
        return list(reply.messages)

    def ack(self, *ids: str) -> int:
        return self.relay.AcknowledgeMessages(
            pb.AcknowledgeMessagesRequest(message_ids=list(ids)),
            metadata=bearer(self.token),
            timeout=10,
        ).acknowledged_count


@pytest.fixture
def people(relay_stack: Stack) -> Iterator[tuple[Person, Person, UserClient]]:
    client = user_client(relay_stack)
    alice, bob = Person(relay_stack, client, "alice"), Person(relay_stack, client, "bob")
    yield alice, bob, client
    client.close()


def test_live_subscription_and_fetch_deliver_then_ack_deletes(
    people: tuple[Person, Person, UserClient],
) -> None:
    alice, bob, _ = people
    stream = bob.relay.SubscribeMessages(
        pb.SubscribeMessagesRequest(), metadata=bearer(bob.token), timeout=10
    )
    received: list[tuple[pb.Envelope, float]] = []

    def listen() -> None:
        for item in stream:
            received.append((item.message, time.monotonic()))
            return

    listener = threading.Thread(target=listen)
    listener.start()
    time.sleep(0.3)  # the stream is open before the message is sent
    sent_at = time.monotonic()
    sent = alice.send("bob", b"\x01ciphertext")
    listener.join(5)
    stream.cancel()  # type: ignore[no-untyped-call]

    assert len(received) == 1
    envelope, arrived_at = received[0]
    assert arrived_at - sent_at < 1.0
    assert (envelope.message_id, envelope.sender_id, envelope.body) == (
        sent.message_id,
        "alice",
        b"\x01ciphertext",
    )
    assert [m.message_id for m in bob.fetch()] == [sent.message_id]
    assert bob.ack(sent.message_id) == 1
    assert bob.fetch() == []


def test_a_subscription_delivers_what_was_queued_before_it_opened(
    people: tuple[Person, Person, UserClient],
) -> None:
    alice, bob, _ = people
    first = alice.send("bob", b"one").message_id
    second = alice.send("bob", b"two").message_id
    stream = bob.relay.SubscribeMessages(
        pb.SubscribeMessagesRequest(), metadata=bearer(bob.token), timeout=10
    )
    items = iter(stream)
    ids = [next(items).message.message_id, next(items).message.message_id]
    stream.cancel()  # type: ignore[no-untyped-call]
    assert ids == [first, second]


def test_unacknowledged_messages_come_again(people: tuple[Person, Person, UserClient]) -> None:
    alice, bob, _ = people
    sent = alice.send("bob", b"hello")
    assert [m.message_id for m in bob.fetch()] == [sent.message_id]
    assert [m.message_id for m in bob.fetch()] == [sent.message_id]


def test_a_message_with_a_one_second_ttl_expires_unread(
    relay_stack: Stack, people: tuple[Person, Person, UserClient]
) -> None:
    alice, bob, _ = people
    alice.send("bob", b"short-lived", ttl=1)
    kept = alice.send("bob", b"long-lived", ttl=60)
    time.sleep(1.5)
    assert [m.message_id for m in bob.fetch()] == [kept.message_id]
    with relay_stack.channel("relay", cert="operator") as channel:
        stats = admin_grpc.RelayAdminServiceStub(channel).GetRelayStats(
            admin_pb.GetRelayStatsRequest(), timeout=10
        )
    assert stats.queued_messages == 1  # swept, not just hidden


def test_fifty_concurrent_acks_delete_once_and_never_fail(
    people: tuple[Person, Person, UserClient],
) -> None:
    alice, bob, _ = people
    message_id = alice.send("bob", b"once").message_id
    barrier = threading.Barrier(50)

    def ack(_: int) -> int:
        barrier.wait()
        return bob.ack(message_id)

    with ThreadPoolExecutor(50) as pool:
        counts = list(pool.map(ack, range(50)))
    assert sorted(counts) == [0] * 49 + [1]
    assert bob.fetch() == []


def test_a_sender_cannot_read_or_acknowledge_the_recipients_queue(
    people: tuple[Person, Person, UserClient],
) -> None:
    alice, bob, _ = people
    sent = alice.send("bob", b"for bob only")
    assert alice.fetch() == []
    assert alice.ack(sent.message_id) == 0
    assert [m.message_id for m in bob.fetch()] == [sent.message_id]


def test_a_revoked_token_can_neither_send_nor_receive(
    people: tuple[Person, Person, UserClient],
) -> None:
    alice, bob, client = people
    stream = bob.relay.SubscribeMessages(
        pb.SubscribeMessagesRequest(), metadata=bearer(bob.token), timeout=10
    )
    alice.send("bob", b"before logout")
    assert next(iter(stream)).message.body == b"before logout"

    client.session.DeleteSession(
        session_pb.DeleteSessionRequest(), metadata=bearer(bob.token), timeout=10
    )
    with pytest.raises(grpc.RpcError) as ended:
        next(iter(stream))  # the open stream notices within its revalidation interval
    assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for call in (lambda: bob.fetch(), lambda: bob.send("alice", b"x")):
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("recipient", "body", "ttl", "code", "message"),
    [
        ("NOT valid", b"x", None, grpc.StatusCode.INVALID_ARGUMENT, "recipient_id must be"),
        ("", b"x", None, grpc.StatusCode.INVALID_ARGUMENT, "recipient_id is required"),
        ("bob", b"", None, grpc.StatusCode.INVALID_ARGUMENT, "body is required"),
        ("bob", b"x" * 65537, None, grpc.StatusCode.RESOURCE_EXHAUSTED, "limit is 65536"),
        ("bob", b"x", 8 * 24 * 3600, grpc.StatusCode.INVALID_ARGUMENT, "ttl must be"),
        ("nobody", b"x", None, grpc.StatusCode.NOT_FOUND, "no active user"),
    ],
)
def test_bad_sends_get_clear_errors(
    people: tuple[Person, Person, UserClient],
    recipient: str,
    body: bytes,
    ttl: float | None,
    code: grpc.StatusCode,
    message: str,
) -> None:
    alice, _, _ = people
    with pytest.raises(grpc.RpcError) as error:
        alice.send(recipient, body, ttl)
    assert error.value.code() == code
    assert message in details(error.value)


def test_bad_fetch_and_ack_requests_are_invalid_argument(
    people: tuple[Person, Person, UserClient],
) -> None:
    alice, _, _ = people
    with pytest.raises(grpc.RpcError) as error:
        alice.relay.FetchMessages(
            pb.FetchMessagesRequest(max_messages=1001), metadata=bearer(alice.token), timeout=10
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as error:
        alice.ack()
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_flooding_a_recipient_is_refused_and_memory_stays_bounded(
    tmp_path: Path, backend: dict[str, str]
) -> None:
    cap = 4 * 1024 * 1024
    stack = start(
        tmp_path,
        backend,
        RELAY_MAX_TOTAL_BYTES=str(cap),
        RELAY_MAX_QUEUE_BYTES=str(cap),
        RELAY_MAX_QUEUE_MESSAGES="100000",
        RELAY_SENDS_PER_MINUTE="100000",
    )
    try:
        client = user_client(stack)
        flooder, victim = Person(stack, client, "flooder"), Person(stack, client, "victim")
        relay = stack["relay"]
        baseline = relay.rss_bytes()
        body = os.urandom(60 * 1024)
        accepted, refusal = 0, None
        for _ in range(200):
            try:
                flooder.send("victim", body)
                accepted += 1
            except grpc.RpcError as exc:
                refusal = exc
                break
        assert refusal is not None
        assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        reasons = ("capacity", "queue is full", "too many undelivered messages")
        assert any(reason in details(refusal) for reason in reasons)
        assert accepted * len(body) <= cap
        with stack.channel("relay", cert="operator") as channel:
            stats = admin_grpc.RelayAdminServiceStub(channel).GetRelayStats(
                admin_pb.GetRelayStatsRequest(), timeout=10
            )
        assert stats.queued_bytes == accepted * len(body)
        assert relay.rss_bytes() - baseline < 3 * cap  # queued bodies plus gRPC buffers
        fetched = victim.fetch()  # still serving; a batch fits one gRPC message
        assert 0 < len(fetched) < accepted
        assert fetched[0].body == body
    finally:
        stack.stop()


def test_an_abuser_is_capped_while_an_honest_user_still_sends(
    tmp_path: Path, backend: dict[str, str]
) -> None:
    # The review's fill: several accounts sending large bodies to recipients they
    # registered themselves and never read. Room for 9 such messages in all, 2 per
    # sender, and fewer once the relay is half full.
    stack = start(
        tmp_path, backend, RELAY_MAX_TOTAL_BYTES="600000", RELAY_MAX_SENDER_BYTES="140000"
    )
    try:
        client = user_client(stack)
        body = os.urandom(64 * 1024)
        held = []
        for n in range(3):
            abuser = Person(stack, client, f"abuser{n}")
            new_user(client, f"sink{n}")
            sent = 0
            with pytest.raises(grpc.RpcError) as refusal:  # noqa: PT012
                while True:
                    abuser.send(f"sink{n}", body)
                    sent += 1
            assert refusal.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "too many undelivered messages" in details(refusal.value)
            held.append(sent)
        assert held == [2, 2, 1]
        alice, bob = Person(stack, client, "alice"), Person(stack, client, "bob")
        alice.send("bob", b"still room for an honest message")
        assert [m.body for m in bob.fetch()] == [b"still room for an honest message"]
    finally:
        stack.stop()


def test_subscriptions_are_capped_per_user_and_in_all(
    tmp_path: Path, backend: dict[str, str]
) -> None:
    stack = start(tmp_path, backend, RELAY_MAX_STREAMS_PER_USER="2", RELAY_MAX_STREAMS="3")
    try:
        client = user_client(stack)
        bob, carol, dave = (Person(stack, client, name) for name in ("bob", "carol", "dave"))

        def subscribe(person: Person) -> Any:
            return person.relay.SubscribeMessages(
                pb.SubscribeMessagesRequest(), metadata=bearer(person.token), timeout=10
            )

        def refusal(person: Person) -> str:
            with pytest.raises(grpc.RpcError) as error:
                next(iter(subscribe(person)))
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            return details(error.value)

        def subscribers() -> int:
            with stack.channel("relay", cert="operator") as channel:
                return (
                    admin_grpc.RelayAdminServiceStub(channel)
                    .GetRelayStats(admin_pb.GetRelayStatsRequest(), timeout=10)
                    .subscribers
                )

        def wait_for(count: int) -> None:
            deadline = time.monotonic() + 5
            while subscribers() != count:
                assert time.monotonic() < deadline, subscribers()
                time.sleep(0.05)

        open_streams = [subscribe(bob), subscribe(bob)]
        wait_for(2)
        assert "2 live subscriptions open" in refusal(bob)
        open_streams.append(subscribe(carol))
        wait_for(3)
        assert "too many live subscriptions" in refusal(dave)
        open_streams.pop(0).cancel()
        wait_for(2)
        open_streams.append(subscribe(dave))
        wait_for(3)
        for stream in open_streams:
            stream.cancel()
    finally:
        stack.stop()


def test_a_sender_over_its_rate_limit_is_told_when_to_retry(
    tmp_path: Path, backend: dict[str, str]
) -> None:
    stack = start(tmp_path, backend, RELAY_SENDS_PER_MINUTE="5")
    try:
        client = user_client(stack)
        alice, _ = Person(stack, client, "alice"), Person(stack, client, "bob")
        for _ in range(5):
            alice.send("bob", b"x")
        with pytest.raises(grpc.RpcError) as error:
            alice.send("bob", b"x")
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry after" in details(error.value)
    finally:
        stack.stop()


def test_a_restart_empties_every_queue(
    relay_stack: Stack, people: tuple[Person, Person, UserClient], backend: dict[str, str]
) -> None:
    """In memory a restart drops the queues; on Redis (shared by replicas) they stay, and
    a restart of Redis, which keeps nothing on disk, drops them."""
    alice, bob, _ = people
    sent = alice.send("bob", b"gone after restart").message_id
    relay_stack["relay"].restart()
    assert [m.message_id for m in bob.fetch()] == ([sent] if backend else [])


def test_a_retried_send_with_its_client_message_id_is_queued_once(
    people: tuple[Person, Person, UserClient],
) -> None:
    alice, bob, _ = people
    request = pb.SendMessageRequest(recipient_id="bob", body=b"once", client_message_id="m-1")
    first = alice.relay.SendMessage(request, metadata=bearer(alice.token), timeout=10)
    retry = alice.relay.SendMessage(request, metadata=bearer(alice.token), timeout=10)
    assert (retry.message_id, retry.expire_time) == (first.message_id, first.expire_time)
    assert [m.message_id for m in bob.fetch()] == [first.message_id]
    request.client_message_id = "\n" * 3
    with pytest.raises(grpc.RpcError) as refused:
        alice.relay.SendMessage(request, metadata=bearer(alice.token), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
