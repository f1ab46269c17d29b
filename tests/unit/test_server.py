"""The shared server bootstrap: error mapping, request ids, health, access rules.

Runs a real gRPC server in-process on a loopback port (plaintext mode) around the
identity servicers, with a store double that fails on purpose.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from securemsg.identity.v1 import identity_internal_service_pb2 as internal_pb
from securemsg.identity.v1 import identity_internal_service_pb2_grpc as internal_grpc
from securemsg.identity.v1 import identity_service_pb2 as pb
from securemsg.identity.v1 import identity_service_pb2_grpc as pb_grpc

from services.common.auth import AuthenticatedUser
from services.common.config import ServerConfig
from services.common.errors import ResourceExhausted
from services.common.server import App, Server, ServiceBinding
from services.identity.domain import Identity
from services.identity.servicer import IdentityInternalServicer, IdentityServicer
from tests.fakes.identity import RecordingRevoker


class ExplodingStore:
    """Every lookup fails the way a bug would; key lookups hit a limit instead."""

    def get_user(self, user_id: str) -> Any:
        raise RuntimeError("secret internal detail: alias=Zed")

    def get_verify_key(self, user_id: str) -> bytes:
        raise ResourceExhausted("slow down", retry_after=2.2)


class Tokens:
    async def validate(self, token: str) -> AuthenticatedUser:
        return AuthenticatedUser(user_id="alice", session_id="s1")


def trailers_of(error: grpc.aio.AioRpcError) -> dict[str, str]:
    pairs: Any = error.trailing_metadata() or ()
    return {str(key): str(value) for key, value in pairs}


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    identity = Identity(ExplodingStore(), RecordingRevoker())  # type: ignore[arg-type]
    app = App(
        bindings=[
            ServiceBinding(
                "securemsg.identity.v1.IdentityService",
                IdentityServicer(identity, Tokens()),
                pb_grpc.add_IdentityServiceServicer_to_server,
            ),
            ServiceBinding(
                "securemsg.identity.v1.IdentityInternalService",
                IdentityInternalServicer(identity),
                internal_grpc.add_IdentityInternalServiceServicer_to_server,
                allowed_callers=frozenset({"session"}),
            ),
        ]
    )
    config = ServerConfig(
        service="identity",
        listen_address="127.0.0.1:0",
        internal_listen_address="127.0.0.1:0",
        tls=None,
        max_message_bytes=64 * 1024,
        shutdown_grace_seconds=0.5,
    )
    server = Server(config, app)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        yield chan
    await server.stop()


async def test_an_unexpected_error_is_internal_with_a_request_id_and_no_details(
    channel: grpc.aio.Channel,
) -> None:
    stub = pb_grpc.IdentityServiceStub(channel)
    call = stub.GetOwnProfile(
        pb.GetOwnProfileRequest(), metadata=(("authorization", "Bearer x"),), timeout=5
    )
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    assert error.value.code() == grpc.StatusCode.INTERNAL
    message = error.value.details() or ""
    assert "secret" not in message
    assert "Traceback" not in message
    trailers = trailers_of(error.value)
    assert trailers["x-request-id"] in message


async def test_a_domain_error_keeps_its_status_message_and_retry_hint(
    channel: grpc.aio.Channel,
) -> None:
    stub = internal_grpc.IdentityInternalServiceStub(channel)
    call = stub.GetVerifyKey(
        internal_pb.GetVerifyKeyRequest(user_id="alice"),
        metadata=(("x-request-id", "trace-me-42"),),
        timeout=5,
    )
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.value.details() == "slow down; retry after 3 s"
    trailers = trailers_of(error.value)
    assert trailers["x-request-id"] == "trace-me-42"
    assert trailers["retry-after"] == "2"


async def test_validation_errors_are_invalid_argument_before_any_storage_access(
    channel: grpc.aio.Channel,
) -> None:
    stub = internal_grpc.IdentityInternalServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.GetVerifyKey(internal_pb.GetVerifyKeyRequest(user_id="NOPE"), timeout=5)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_oversized_requests_are_resource_exhausted(channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.IdentityServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.RegisterUser(pb.RegisterUserRequest(alias="x" * 100_000), timeout=5)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_health_reports_each_hosted_service(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "securemsg.identity.v1.IdentityService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
