"""Every RPC of every service, who may call it, and calling any of them generically."""

from __future__ import annotations

from typing import Any

import grpc
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


def empty_request(method: MethodDescriptor) -> Any:
    return message_factory.GetMessageClass(method.input_type)()


def _serialize(message: Any) -> bytes:
    return bytes(message) if isinstance(message, bytes) else message.SerializeToString()


def status_of(
    channel: grpc.Channel,
    method: MethodDescriptor,
    request: Any,
    metadata: tuple[Any, ...],
    *,
    timeout: float,
) -> tuple[str, str]:
    """Status code name and message of calling `method` (a stream: to its first message).

    `request` is a message, or raw bytes sent as they are (for byte-level fuzzing).
    """
    path = f"/{method.containing_service.full_name}/{method.name}"
    response_class = message_factory.GetMessageClass(method.output_type)
    try:
        if method.server_streaming:
            stream = channel.unary_stream(
                path, request_serializer=_serialize,
                response_deserializer=response_class.FromString,
            )  # fmt: skip
            next(iter(stream(request, metadata=metadata, timeout=timeout)), None)
        else:
            unary = channel.unary_unary(
                path, request_serializer=_serialize,
                response_deserializer=response_class.FromString,
            )  # fmt: skip
            unary(request, metadata=metadata, timeout=timeout)
    except grpc.RpcError as exc:
        return str(exc.code().name), str(exc.details() or "")
    return "OK", ""
