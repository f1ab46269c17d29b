"""The one helper for calls between services, against a real gRPC server on loopback.

The peer is a scripted SessionInternalService: it fails with the listed statuses first,
then answers.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from securemsg.session.v1 import session_internal_service_pb2 as pb
from securemsg.session.v1 import session_internal_service_pb2_grpc as pb_grpc

from services.common import peer_client
from services.common.errors import Unauthenticated, Unavailable
from tests.support.stack import free_port


class ScriptedPeer(pb_grpc.SessionInternalServiceServicer):
    def __init__(self) -> None:
        self.failures: list[grpc.StatusCode] = []
        self.calls = 0

    async def ValidateSession(
        self, request: pb.ValidateSessionRequest, context: Any
    ) -> pb.ValidateSessionResponse:
        self.calls += 1
        if self.failures:
            await context.abort(self.failures.pop(0), "peer internals: not for end users")
        return pb.ValidateSessionResponse(user_id="alice", session_id="s1")


@pytest.fixture
async def peer() -> AsyncIterator[tuple[ScriptedPeer, grpc.aio.Channel]]:
    servicer = ScriptedPeer()
    server = grpc.aio.server()
    pb_grpc.add_SessionInternalServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield servicer, channel
    await channel.close(grace=None)
    await server.stop(None)


async def _validate(channel: grpc.aio.Channel, **options: Any) -> pb.ValidateSessionResponse:
    stub = pb_grpc.SessionInternalServiceStub(channel)
    return await peer_client.call(
        stub.ValidateSession,
        pb.ValidateSessionRequest(token="t"),
        unavailable="cannot check the token right now; retry",
        **{"idempotent": True, **options},
    )


async def test_an_idempotent_call_is_retried_on_unavailable(
    peer: tuple[ScriptedPeer, grpc.aio.Channel],
) -> None:
    servicer, channel = peer
    servicer.failures = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    reply = await _validate(channel)
    assert reply.user_id == "alice"
    assert servicer.calls == 3


async def test_a_call_that_is_not_idempotent_is_tried_once(
    peer: tuple[ScriptedPeer, grpc.aio.Channel],
) -> None:
    servicer, channel = peer
    servicer.failures = [grpc.StatusCode.UNAVAILABLE]
    with pytest.raises(Unavailable) as error:
        await _validate(channel, idempotent=False)
    assert error.value.message == "cannot check the token right now; retry"
    assert servicer.calls == 1


async def test_other_statuses_are_not_retried_and_the_peer_message_stays_inside(
    peer: tuple[ScriptedPeer, grpc.aio.Channel],
) -> None:
    servicer, channel = peer
    servicer.failures = [grpc.StatusCode.INTERNAL]
    with pytest.raises(Unavailable) as error:
        await _validate(channel)
    assert "peer internals" not in error.value.message
    assert servicer.calls == 1


async def test_a_mapped_answer_becomes_the_callers_own_error(
    peer: tuple[ScriptedPeer, grpc.aio.Channel],
) -> None:
    servicer, channel = peer
    servicer.failures = [grpc.StatusCode.UNAUTHENTICATED]
    answers = {grpc.StatusCode.UNAUTHENTICATED: lambda: Unauthenticated("log in again")}
    with pytest.raises(Unauthenticated, match="log in again"):
        await _validate(channel, answers=answers)
    assert servicer.calls == 1


async def test_an_absent_peer_is_waited_for_until_the_deadline_then_unavailable() -> None:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(Unavailable):
        await _validate(channel, deadline_seconds=0.5)
    assert 0.4 < time.monotonic() - started < 3.0
    await channel.close(grace=None)
