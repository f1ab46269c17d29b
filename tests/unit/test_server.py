"""The shared server bootstrap: error mapping, request ids, health, access rules.

Runs a real gRPC server in-process on a loopback port (plaintext mode) around the
identity servicers, with a store double that fails on purpose.
"""

from __future__ import annotations

import re
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
from services.common.config import Env, ServerConfig
from services.common.errors import ResourceExhausted, StartupError
from services.common.server import App, Server, ServiceBinding
from services.identity.domain import Identity
from services.identity.factors import Factors
from services.identity.passwords import HashParameters, PasswordHasher
from services.identity.servicer import IdentityInternalServicer, IdentityServicer
from tests.fakes.identity import RecordingRevoker
from tests.fakes.outbox import RecordingAuditSink

GET_VERIFY_KEY = "/securemsg.identity.v1.IdentityInternalService/GetVerifyKey"


class ExplodingStore:
    """Every lookup fails the way a bug would; key lookups hit a limit instead."""

    def get_user(self, user_id: str) -> Any:
        raise RuntimeError("secret internal detail: alias=Zed")

    def get_verify_key(self, user_id: str) -> bytes:
        raise ResourceExhausted("slow down", retry_after=2.2)


class Tokens:
    async def validate(self, token: str) -> AuthenticatedUser:
        return AuthenticatedUser(user_id="alice", session_id="s1")

    async def check(
        self, token: str, *, accept_restricted: bool = False, fresh: bool = False
    ) -> AuthenticatedUser:
        return await self.validate(token)


def trailers_of(error: grpc.aio.AioRpcError) -> dict[str, str]:
    pairs: Any = error.trailing_metadata() or ()
    return {str(key): str(value) for key, value in pairs}


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    identity = Identity(ExplodingStore(), RecordingRevoker())  # type: ignore[arg-type]
    factors = Factors(
        ExplodingStore(),  # type: ignore[arg-type]
        ExplodingStore(),  # type: ignore[arg-type]
        PasswordHasher(HashParameters(time_cost=1, memory_kib=8)),
        RecordingAuditSink(),
    )
    app = App(
        bindings=[
            ServiceBinding(
                "securemsg.identity.v1.IdentityService",
                IdentityServicer(identity, factors, Tokens()),
                pb_grpc.add_IdentityServiceServicer_to_server,
            ),
            ServiceBinding(
                "securemsg.identity.v1.IdentityInternalService",
                IdentityInternalServicer(identity, factors),
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
    yield server
    await server.stop()


@pytest.fixture
async def channel(server: Server) -> AsyncIterator[grpc.aio.Channel]:
    """The public port."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        yield chan


@pytest.fixture
async def internal(server: Server) -> AsyncIterator[grpc.aio.Channel]:
    """The internal port (plaintext mode: loopback callers only)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.internal_port}") as chan:
        yield chan


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
    internal: grpc.aio.Channel,
) -> None:
    stub = internal_grpc.IdentityInternalServiceStub(internal)
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
    internal: grpc.aio.Channel,
) -> None:
    stub = internal_grpc.IdentityInternalServiceStub(internal)
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


async def test_a_request_id_of_any_other_shape_is_replaced_not_logged(
    channel: grpc.aio.Channel,
) -> None:
    stub = pb_grpc.IdentityServiceStub(channel)
    forged = 'x", "level": "error", "message": "forged'
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.GetOwnProfile(
            pb.GetOwnProfileRequest(),
            metadata=(("authorization", "Bearer x"), ("x-request-id", forged)),
            timeout=5,
        )
    rid = trailers_of(error.value)["x-request-id"]
    assert rid != forged
    assert re.fullmatch(r"[0-9a-f]{16}", rid)


@pytest.mark.parametrize(
    "data",
    [
        b"\x0a\x02\xff\xfe",  # field 1 (user_id, a string) holding invalid UTF-8
        b"\xff\xff\xff",  # no valid wire format at all
        b"\x0a\x7f" + b"a" * 3,  # length past the end
    ],
)
async def test_an_undecodable_request_is_invalid_argument_with_a_fixed_message(
    internal: grpc.aio.Channel, data: bytes
) -> None:
    call = internal.unary_unary(GET_VERIFY_KEY, None, None)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call(data, timeout=5)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == (
        "the request is not a valid serialized GetVerifyKeyRequest; build it with code "
        "generated from this service's .proto files"
    )


async def test_an_undecodable_request_from_a_stranger_is_still_permission_denied(
    channel: grpc.aio.Channel,
) -> None:
    call = channel.unary_unary(GET_VERIFY_KEY, None, None)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call(b"\xff\xff", timeout=5)
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_plaintext_mode_serves_internal_apis_to_loopback_only_on_the_internal_port(
    channel: grpc.aio.Channel,
) -> None:
    # A same-host TLS-terminating proxy in front of the public port would make every
    # client a loopback peer: the public port must never grant internal rights.
    stub = internal_grpc.IdentityInternalServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.GetVerifyKey(internal_pb.GetVerifyKeyRequest(user_id="alice"), timeout=5)
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "internal port" in (error.value.details() or "")


@pytest.mark.parametrize("variable", ["LISTEN_ADDRESS", "INTERNAL_LISTEN_ADDRESS"])
@pytest.mark.parametrize("address", ["0.0.0.0:50051", "10.1.2.3:50051", "[::]:50051", ":50051"])
def test_plaintext_mode_refuses_to_listen_beyond_loopback(variable: str, address: str) -> None:
    env = Env({"INSECURE_PLAINTEXT": "true", variable: address})
    with pytest.raises(StartupError, match=f"{variable}=.* is not a loopback address"):
        ServerConfig.from_env("identity", env)


@pytest.mark.parametrize("address", ["127.0.0.1:0", "[::1]:50051", "localhost:50051"])
def test_plaintext_mode_listens_on_loopback(address: str) -> None:
    env = Env({"INSECURE_PLAINTEXT": "true", "LISTEN_ADDRESS": address})
    assert ServerConfig.from_env("identity", env).listen_address == address
