"""Batched delivery through real processes: SendMessages (one call, one ciphertext per
recipient) and StreamMessages (pushes and acknowledgements on one stream), on both queue
stores."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from securemsg.relay.v1 import relay_service_pb2 as pb
from securemsg.relay.v1 import relay_service_pb2_grpc as pb_grpc

from tests.support.redis import relay_env
from tests.support.stack import Stack
from tests.support.users import bearer, details, new_user, user_client


@pytest.fixture(params=["memory", "redis"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    backend = (
        {} if request.param == "memory" else relay_env(request.getfixturevalue("redis_server"))
    )
    stack = Stack(tmp_path, ("identity", "session", "relay"), extra_env={"relay": backend})
    stack.start()
    yield stack
    stack.stop()


def tokens(stack: Stack, *names: str) -> dict[str, str]:
    client = user_client(stack)
    try:
        return {name: client.login(name, new_user(client, name)) for name in names}
    finally:
        client.close()


class Requests:
    """A client's side of StreamMessages: requests sent when the test says."""

    def __init__(self) -> None:
        self._queue: queue.Queue[pb.StreamMessagesRequest | None] = queue.Queue()

    def ack(self, *ids: str) -> None:
        self._queue.put(pb.StreamMessagesRequest(acknowledged_message_ids=ids))

    def close(self) -> None:
        self._queue.put(None)

    def __iter__(self) -> Iterator[pb.StreamMessagesRequest]:
        while (request := self._queue.get()) is not None:
            yield request


def test_a_group_message_in_one_call_reaches_each_member_on_one_stream_each(
    stack: Stack,
) -> None:
    token = tokens(stack, "alice", "bob", "carol")
    with stack.channel("relay") as channel:
        relay = pb_grpc.RelayServiceStub(channel)
        sent = relay.SendMessages(
            pb.SendMessagesRequest(
                messages=[
                    pb.OutgoingMessage(recipient_id="bob", body=b"for bob"),
                    pb.OutgoingMessage(recipient_id="carol", body=b"for carol"),
                ]
            ),
            metadata=bearer(token["alice"]),
            timeout=10,
        ).results
        assert len(sent) == 2
        for name, result in zip(("bob", "carol"), sent, strict=True):
            requests = Requests()
            stream = relay.StreamMessages(iter(requests), metadata=bearer(token[name]))
            try:
                (envelope,) = next(iter(stream)).messages
                assert (envelope.message_id, envelope.sender_id, envelope.body) == (
                    result.message_id, "alice", f"for {name}".encode(),
                )  # fmt: skip
                requests.ack(envelope.message_id)
                requests.close()
                # Acknowledged on the stream: gone from the queue.
                while relay.FetchMessages(
                    pb.FetchMessagesRequest(), metadata=bearer(token[name]), timeout=10
                ).messages:
                    threading.Event().wait(0.02)
            finally:
                stream.cancel()  # type: ignore[no-untyped-call]


def test_a_batch_is_all_or_nothing_and_names_the_message_that_failed(stack: Stack) -> None:
    token = tokens(stack, "alice", "bob")
    with stack.channel("relay") as channel:
        relay = pb_grpc.RelayServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            relay.SendMessages(
                pb.SendMessagesRequest(
                    messages=[
                        pb.OutgoingMessage(recipient_id="bob", body=b"x"),
                        pb.OutgoingMessage(recipient_id="nobody", body=b"x"),
                    ]
                ),
                metadata=bearer(token["alice"]),
                timeout=10,
            )
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert details(refused.value).startswith("messages[1]: no active user")
        reply = relay.FetchMessages(
            pb.FetchMessagesRequest(), metadata=bearer(token["bob"]), timeout=10
        )
        assert list(reply.messages) == []


def test_a_stream_without_a_token_or_with_a_garbled_request_is_refused(stack: Stack) -> None:
    token = tokens(stack, "bob")
    with stack.channel("relay") as channel:
        relay = pb_grpc.RelayServiceStub(channel)
        with pytest.raises(grpc.RpcError) as anonymous:
            next(iter(relay.StreamMessages(iter([]))))
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        raw = channel.stream_stream(
            "/securemsg.relay.v1.RelayService/StreamMessages",
            request_serializer=None,
            response_deserializer=pb.StreamMessagesResponse.FromString,
        )
        # Field 1 as a string holding invalid UTF-8: not a StreamMessagesRequest.
        with pytest.raises(grpc.RpcError) as garbled:
            list(raw(iter([b"\x0a\x02\xff\xfe"]), metadata=bearer(token["bob"]), timeout=10))
        assert garbled.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "StreamMessagesRequest" in details(garbled.value)
