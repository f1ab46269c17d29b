"""The token cache's bound holds however slowly the session service answers.

A real gRPC server on loopback plays the session service; its answer takes 1.5 s on the
test's clock. With a 2 s cache, the answer may be trusted until 2 s after the question
was asked, not 2 s after the answer arrived (the review saw a revoked token pass 2.9 s
after revocation that way).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from securemsg.session.v1 import session_internal_service_pb2 as pb
from securemsg.session.v1 import session_internal_service_pb2_grpc as pb_grpc

from services.common.auth import RemoteTokenValidator
from tests.unit.conftest import FakeClock


class SlowSession(pb_grpc.SessionInternalServiceServicer):
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls = 0

    async def ValidateSession(
        self, request: pb.ValidateSessionRequest, context: Any
    ) -> pb.ValidateSessionResponse:
        self.calls += 1
        self.clock.advance(1.5)
        return pb.ValidateSessionResponse(user_id="alice", session_id="s1")


@pytest.fixture
async def session(clock: FakeClock) -> AsyncIterator[tuple[SlowSession, grpc.aio.Channel]]:
    servicer = SlowSession(clock)
    server = grpc.aio.server()
    pb_grpc.add_SessionInternalServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield servicer, channel
    await channel.close(grace=None)
    await server.stop(None)


async def test_a_slow_answer_is_trusted_only_until_the_bound_after_the_question(
    session: tuple[SlowSession, grpc.aio.Channel], clock: FakeClock
) -> None:
    servicer, channel = session
    tokens = RemoteTokenValidator(channel, cache_seconds=2.0, clock=clock)
    assert (await tokens.validate("t" * 43)).user_id == "alice"
    clock.advance(0.4)  # 1.9 s after asking: still within the bound
    await tokens.validate("t" * 43)
    assert servicer.calls == 1
    clock.advance(0.2)  # 2.1 s after asking: must ask again
    await tokens.validate("t" * 43)
    assert servicer.calls == 2
