"""Reading and feeding the audit service as tests need to."""

from __future__ import annotations

import time
import uuid

from securemsg.audit.v1 import audit_admin_service_pb2 as admin_pb
from securemsg.audit.v1 import audit_admin_service_pb2_grpc as admin_grpc
from securemsg.audit.v1 import audit_event_pb2
from securemsg.audit.v1 import audit_ingest_service_pb2 as ingest_pb
from securemsg.audit.v1 import audit_ingest_service_pb2_grpc as ingest_grpc
from securemsg.audit.v1 import audit_service_pb2 as pb
from securemsg.audit.v1 import audit_service_pb2_grpc as pb_grpc

from services.common import convert
from tests.support.stack import Stack


def operator_list(stack: Stack, **filters: object) -> list[audit_event_pb2.AuditEvent]:
    """Every matching event, newest first, following page tokens."""
    events: list[audit_event_pb2.AuditEvent] = []
    with stack.channel("audit", cert="operator") as channel:
        stub = pb_grpc.AuditServiceStub(channel)
        token = ""
        while True:
            page = stub.ListAuditEvents(
                pb.ListAuditEventsRequest(page_size=100, page_token=token, **filters),  # type: ignore[arg-type]
                timeout=10,
            )
            events.extend(page.events)
            token = page.next_page_token
            if not token:
                return events


def audit_total(stack: Stack) -> int:
    with stack.channel("audit", cert="operator") as channel:
        stats = admin_grpc.AuditAdminServiceStub(channel).GetAuditStats(
            admin_pb.GetAuditStatsRequest(), timeout=10
        )
    return stats.total_events


def events(
    count: int, source: str = "identity", **fields: object
) -> list[audit_event_pb2.AuditEvent]:
    now = time.time()
    return [
        audit_event_pb2.AuditEvent(
            event_id=uuid.uuid4().hex,
            action=str(fields.get("action", "user_login")),
            source=source,
            user_id=str(fields.get("user_id", f"user{i % 3}")),
            occur_time=convert.timestamp(now + i),
            details={"n": str(i)},
        )
        for i in range(count)
    ]


def append(
    stack: Stack, batch: list[audit_event_pb2.AuditEvent], cert: str = "identity"
) -> ingest_pb.AppendAuditEventsResponse:
    with stack.channel("audit", cert=cert) as channel:
        return ingest_grpc.AuditIngestServiceStub(channel).AppendAuditEvents(
            ingest_pb.AppendAuditEventsRequest(events=batch), timeout=10
        )


def verify(stack: Stack) -> admin_pb.VerifyAuditLogResponse:
    """The operator's VerifyAuditLog over the whole log."""
    with stack.channel("audit", cert="operator") as channel:
        return admin_grpc.AuditAdminServiceStub(channel).VerifyAuditLog(
            admin_pb.VerifyAuditLogRequest(), timeout=30
        )
