"""Every RPC of every service, who may call it, and calling any of them generically."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor

from services.common import catalog

# proto service (with its host where several serve it) -> (host, certificate names
# allowed; None means the public API). From the catalog, where the deployment states it
# once; tests/unit/test_catalog.py holds the catalog to docs/ARCHITECTURE.md's table.
POLICY: dict[Any, tuple[str, frozenset[str] | None]] = {}
for api in catalog.APIS:
    hosted_by_many = api.descriptor.name == "DatabaseAdminService"
    POLICY[(api.descriptor, api.host) if hosted_by_many else api.descriptor] = (
        api.host,
        api.callers,
    )


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
