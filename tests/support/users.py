"""Acting as a client: the SDK's UserClient against a test stack, and registrations."""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.protobuf.message import Message
from securemsg.identity.v1 import identity_service_pb2 as identity_pb
from securemsg.session.v1 import session_internal_service_pb2 as internal_pb
from securemsg.session.v1 import session_internal_service_pb2_grpc as internal_grpc

from services.client.keys import UserKeys
from services.client.sdk import Endpoints, UserClient, registration_request
from tests.support.stack import Stack

TEST_METADATA = {"device": "test-phone"}


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def endpoints(stack: Stack) -> Endpoints:
    """Where the stack's APIs listen, trusted through its CA."""
    ports = {name: public for name, (public, _, _) in stack.ports.items()}
    internal = {name: port for name, (_, port, _) in stack.ports.items()}
    return Endpoints(ca_file=stack.layout.tls / "ca.pem", ports=ports, internal_ports=internal)


def user_client(stack: Stack) -> UserClient:
    """One end user's view of the stack: the SDK's client, over TLS without a certificate."""
    return UserClient(endpoints(stack))


def registration(
    user_id: str, keys: UserKeys, /, **overrides: object
) -> identity_pb.RegisterUserRequest:
    """The request the SDK sends for `keys`, with fields replaced by `overrides`.

    An override of None clears the field; lists and maps replace the whole field.
    """
    request = registration_request(user_id, f"Alias of {user_id}", keys, TEST_METADATA)
    for field, value in overrides.items():
        if value is None:
            request.ClearField(field)  # type: ignore[arg-type]
        elif field == "metadata":
            request.metadata.clear()
            request.metadata.update(value)  # type: ignore[call-overload]
        elif field == "one_time_prekeys":
            del request.one_time_prekeys[:]
            request.one_time_prekeys.extend(value)  # type: ignore[arg-type]
        elif isinstance(value, Message):
            getattr(request, field).CopyFrom(value)
        else:
            setattr(request, field, value)
    return request


def new_user(
    client: UserClient,
    user_id: str,
    *,
    one_time: int = 10,
    alias: str = "",
    metadata: Mapping[str, str] = TEST_METADATA,
) -> UserKeys:
    """Registers `user_id` with fresh keys (`one_time` one-time prekeys); returns the keys."""
    keys = UserKeys.generate(one_time)
    client.register(user_id, alias or f"Alias of {user_id}", keys, metadata)
    return keys


def details(error: grpc.RpcError) -> str:
    """The status message of a failed call (what a person would read)."""
    return str(error.details() or "")


def validate(stack: Stack, token: str) -> internal_pb.ValidateSessionResponse:
    """Checks a token the way the other services do (relay's certificate)."""
    with stack.channel("session", cert="relay") as channel:
        stub = internal_grpc.SessionInternalServiceStub(channel)
        return stub.ValidateSession(internal_pb.ValidateSessionRequest(token=token), timeout=10)
