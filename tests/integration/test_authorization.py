"""Who may call what: every RPC of every service, from every kind of caller.

Callers: anonymous (public port, no token), a user (public port, bearer token), and
each certificate name on the internal port. A cell passes when the call gets past
authentication and authorization (any other status, e.g. INVALID_ARGUMENT for the empty
request used here, means it was let in) or is refused with the expected status.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from securemsg.admin.v1 import database_admin_service_pb2
from securemsg.audit.v1 import audit_admin_service_pb2, audit_ingest_service_pb2, audit_service_pb2
from securemsg.identity.v1 import (
    identity_admin_service_pb2,
    identity_internal_service_pb2,
    identity_service_pb2,
)
from securemsg.relay.v1 import relay_admin_service_pb2, relay_service_pb2
from securemsg.session.v1 import (
    session_admin_service_pb2,
    session_internal_service_pb2,
    session_service_pb2,
)

from tests.support.stack import Stack
from tests.support.users import Client

CERTS = ("identity", "session", "relay", "audit", "operator")
CALLERS = ("anonymous", "user", *CERTS)
ANONYMOUS_OK = {"RegisterUser", "CreateChallenge", "CreateSession"}

# proto service -> (host, certificate names allowed; None means the public API)
POLICY: dict[Any, tuple[str, frozenset[str] | None]] = {
    identity_service_pb2.DESCRIPTOR.services_by_name["IdentityService"]: ("identity", None),
    identity_internal_service_pb2.DESCRIPTOR.services_by_name["IdentityInternalService"]: (
        "identity", frozenset({"session", "relay"})),
    identity_admin_service_pb2.DESCRIPTOR.services_by_name["IdentityAdminService"]: (
        "identity", frozenset({"operator"})),
    session_service_pb2.DESCRIPTOR.services_by_name["SessionService"]: ("session", None),
    session_internal_service_pb2.DESCRIPTOR.services_by_name["SessionInternalService"]: (
        "session", frozenset({"identity", "relay", "audit"})),
    session_admin_service_pb2.DESCRIPTOR.services_by_name["SessionAdminService"]: (
        "session", frozenset({"identity", "operator"})),
    relay_service_pb2.DESCRIPTOR.services_by_name["RelayService"]: ("relay", None),
    relay_admin_service_pb2.DESCRIPTOR.services_by_name["RelayAdminService"]: (
        "relay", frozenset({"operator"})),
    audit_service_pb2.DESCRIPTOR.services_by_name["AuditService"]: ("audit", None),
    audit_ingest_service_pb2.DESCRIPTOR.services_by_name["AuditIngestService"]: (
        "audit", frozenset({"identity", "session", "relay"})),
    audit_admin_service_pb2.DESCRIPTOR.services_by_name["AuditAdminService"]: (
        "audit", frozenset({"operator"})),
}  # fmt: skip
DATABASE_ADMIN = database_admin_service_pb2.DESCRIPTOR.services_by_name["DatabaseAdminService"]
for host in ("identity", "session", "audit"):
    POLICY[(DATABASE_ADMIN, host)] = (host, frozenset({"operator"}))


def cases() -> Iterator[Any]:
    for key, (host, allowed) in POLICY.items():
        service = key[0] if isinstance(key, tuple) else key
        for method in service.methods:
            for caller in CALLERS:
                yield pytest.param(
                    host,
                    method,
                    allowed,
                    caller,
                    id=f"{host}:{service.name}.{method.name}:{caller}",
                )


def expected(method: MethodDescriptor, allowed: frozenset[str] | None, caller: str) -> str:
    if allowed is not None:  # internal or operator API
        return "let in" if caller in allowed else "PERMISSION_DENIED"
    if method.containing_service.name == "AuditService" and caller == "operator":
        return "let in"
    if caller == "user" or method.name in ANONYMOUS_OK:
        return "let in"
    return "UNAUTHENTICATED"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("authz"), ("identity", "session", "relay", "audit"))
    stack.start()
    yield stack
    stack.stop()


def fresh_token(stack: Stack) -> str:
    """A new user per cell: some calls (DeactivateAccount, DeleteSession) are final."""
    client = Client(stack)
    user_id = f"matrix-{uuid.uuid4().hex[:12]}"
    token = client.login(user_id, client.register(user_id, one_time=1))
    client.close()
    return token


@pytest.mark.parametrize(("host", "method", "allowed", "caller"), list(cases()))
def test_authorization_matrix(
    stack: Stack,
    host: str,
    method: MethodDescriptor,
    allowed: frozenset[str] | None,
    caller: str,
) -> None:
    path = f"/{method.containing_service.full_name}/{method.name}"
    metadata = (("authorization", f"Bearer {fresh_token(stack)}"),) if caller == "user" else ()
    cert = caller if caller in CERTS else None
    with stack.channel(host, cert=cert) as channel:
        code = _call(channel, method, path, metadata)
    assert code not in {"UNKNOWN", "INTERNAL"}
    outcome = code if code in {"PERMISSION_DENIED", "UNAUTHENTICATED"} else "let in"
    assert outcome == expected(method, allowed, caller)


def _call(
    channel: grpc.Channel, method: MethodDescriptor, path: str, metadata: tuple[Any, ...]
) -> str:
    """The status code name of calling `method` with an empty request."""
    request = message_factory.GetMessageClass(method.input_type)()
    response_class = message_factory.GetMessageClass(method.output_type)
    try:
        if method.server_streaming:
            stream = channel.unary_stream(
                path, request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response_class.FromString,
            )  # fmt: skip
            next(iter(stream(request, metadata=metadata, timeout=1.5)))
        else:
            unary = channel.unary_unary(
                path, request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response_class.FromString,
            )  # fmt: skip
            unary(request, metadata=metadata, timeout=5)
    except grpc.RpcError as exc:
        return str(exc.code().name)
    return "OK"
