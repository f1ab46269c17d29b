"""RESOURCE_EXHAUSTED says when to retry the way gRPC clients expect: a
google.rpc.RetryInfo detail (AIP-193), set once by the server's error mapping; the SDK
reads it and, when asked to, waits and tries once more.

A real server (the shared bootstrap, plaintext on loopback) hosts an IdentityService
whose RegisterUser is over its limit for the first calls.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from securemsg.identity.v1 import identity_service_pb2 as pb
from securemsg.identity.v1 import identity_service_pb2_grpc as pb_grpc

from services.client.keys import UserKeys
from services.client.sdk import Endpoints, UserClient, retry_delay
from services.common.config import ServerConfig
from services.common.errors import ResourceExhausted
from services.common.server import App, Server, ServiceBinding


class LimitedIdentity(pb_grpc.IdentityServiceServicer):
    """Refuses the first `refusals` registrations with a retry delay, then accepts."""

    def __init__(self) -> None:
        self.refusals = 1
        self.retry_after = 0.25
        self.calls = 0

    async def RegisterUser(
        self, request: pb.RegisterUserRequest, context: Any
    ) -> pb.RegisterUserResponse:
        self.calls += 1
        if self.calls <= self.refusals:
            raise ResourceExhausted("too many registrations", retry_after=self.retry_after)
        return pb.RegisterUserResponse(profile=pb.Profile(user_id=request.user_id))


@pytest.fixture
async def served() -> AsyncIterator[tuple[LimitedIdentity, int]]:
    servicer = LimitedIdentity()  # type: ignore[abstract]  # the other RPCs: UNIMPLEMENTED
    binding = ServiceBinding(
        "securemsg.identity.v1.IdentityService",
        servicer,
        pb_grpc.add_IdentityServiceServicer_to_server,
    )
    config = ServerConfig(
        service="identity",
        listen_address="127.0.0.1:0",
        internal_listen_address="127.0.0.1:0",
        tls=None,
        max_message_bytes=64 * 1024,
        shutdown_grace_seconds=0.5,
    )
    server = Server(config, App(bindings=[binding]))
    await server.start()
    yield servicer, server.port
    await server.stop()


def _client(port: int, **options: Any) -> UserClient:
    ports = {"identity": port, "session": port, "relay": port}
    return UserClient(Endpoints(ca_file=None, ports=ports), **options)


def _register_over_a_plain_stub(port: int) -> grpc.RpcError:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            pb_grpc.IdentityServiceStub(channel).RegisterUser(pb.RegisterUserRequest(), timeout=5)
        except grpc.RpcError as exc:
            return exc
    raise AssertionError("RegisterUser was not refused")


async def test_the_retry_delay_is_a_retry_info_detail_beside_the_message(
    served: tuple[LimitedIdentity, int],
) -> None:
    _, port = served
    error = await asyncio.to_thread(_register_over_a_plain_stub, port)
    assert isinstance(error, grpc.Call)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == "too many registrations; retry after 1 s"
    status = rpc_status.from_call(error)
    assert status is not None
    assert status.message == "too many registrations; retry after 1 s"
    infos = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert len(infos) == 1
    info = error_details_pb2.RetryInfo()
    infos[0].Unpack(info)
    assert info.retry_delay.ToMilliseconds() == 250
    pairs: Any = error.trailing_metadata() or ()
    assert dict(pairs)["retry-after"] == "1"  # kept for clients that read the older trailer


async def test_the_sdk_reads_the_delay_and_by_default_does_not_wait(
    served: tuple[LimitedIdentity, int],
) -> None:
    servicer, port = served
    with _client(port) as client, pytest.raises(grpc.RpcError) as error:
        await asyncio.to_thread(client.register, "alice", "Alice", UserKeys.generate(0))
    assert retry_delay(error.value) == pytest.approx(0.25)
    assert servicer.calls == 1


async def test_the_sdk_waits_a_short_delay_and_tries_once_more(
    served: tuple[LimitedIdentity, int],
) -> None:
    servicer, port = served
    waits: list[float] = []
    started = time.monotonic()
    with _client(port, max_wait_when_limited=1.0, on_wait=waits.append) as client:
        profile = await asyncio.to_thread(client.register, "alice", "Alice", UserKeys.generate(0))
    assert time.monotonic() - started >= 0.25  # it did wait before trying again
    assert profile.user_id == "alice"
    assert waits == [pytest.approx(0.25)]
    assert servicer.calls == 2


async def test_the_sdk_does_not_wait_longer_than_allowed_nor_retry_twice(
    served: tuple[LimitedIdentity, int],
) -> None:
    servicer, port = served
    servicer.retry_after = 5.0
    with _client(port, max_wait_when_limited=1.0) as client, pytest.raises(grpc.RpcError):
        await asyncio.to_thread(client.register, "alice", "Alice", UserKeys.generate(0))
    assert servicer.calls == 1
    servicer.retry_after, servicer.refusals, servicer.calls = 0.1, 2, 0
    with _client(port, max_wait_when_limited=1.0) as client, pytest.raises(grpc.RpcError):
        await asyncio.to_thread(client.register, "alice", "Alice", UserKeys.generate(0))
    assert servicer.calls == 2
