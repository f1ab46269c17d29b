"""gRPC transport for the audit log."""

from __future__ import annotations

import asyncio

from securemsg.audit.v1 import audit_admin_service_pb2 as admin_pb
from securemsg.audit.v1 import audit_admin_service_pb2_grpc as admin_grpc
from securemsg.audit.v1 import audit_event_pb2
from securemsg.audit.v1 import audit_ingest_service_pb2 as ingest_pb
from securemsg.audit.v1 import audit_ingest_service_pb2_grpc as ingest_grpc
from securemsg.audit.v1 import audit_service_pb2 as pb
from securemsg.audit.v1 import audit_service_pb2_grpc as pb_grpc

from services.audit.domain import AuditLog, ListRequest, Reader
from services.audit.model import NewEvent, StoredEvent
from services.common import convert, metrics, peers
from services.common.auth import TokenValidator, authenticate
from services.common.errors import IntegrityError
from services.common.peers import Context


def _event(event: StoredEvent) -> audit_event_pb2.AuditEvent:
    return audit_event_pb2.AuditEvent(
        event_id=event.event_id,
        action=event.action,
        source=event.source,
        user_id=event.user_id,
        occur_time=convert.timestamp(event.occur_time),
        details=event.details,
        sequence=event.sequence,
        record_time=convert.timestamp(event.record_time),
    )


class AuditServicer(pb_grpc.AuditServiceServicer):
    def __init__(self, log: AuditLog, tokens: TokenValidator) -> None:
        self._log = log
        self._tokens = tokens

    async def _reader(self, context: Context) -> Reader:
        if peers.acts_as_operator(context):
            return Reader(operator=True)
        user = await authenticate(context, self._tokens)
        return Reader(operator=False, user_id=user.user_id)

    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: Context
    ) -> pb.ListAuditEventsResponse:
        reader = await self._reader(context)
        query = ListRequest(
            user_id=request.user_id,
            action=request.action,
            start_time=(
                convert.seconds(request.start_time, "start_time")
                if request.HasField("start_time")
                else None
            ),
            end_time=convert.seconds(request.end_time, "end_time")
            if request.HasField("end_time")
            else None,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        events, token = await asyncio.to_thread(self._log.list, reader, query)
        return pb.ListAuditEventsResponse(events=[_event(e) for e in events], next_page_token=token)


class AuditIngestServicer(ingest_grpc.AuditIngestServiceServicer):
    def __init__(self, log: AuditLog) -> None:
        self._log = log

    async def AppendAuditEvents(
        self, request: ingest_pb.AppendAuditEventsRequest, context: Context
    ) -> ingest_pb.AppendAuditEventsResponse:
        events = [
            NewEvent(
                event_id=e.event_id,
                action=e.action,
                source=e.source,
                user_id=e.user_id,
                occur_time=convert.seconds(e.occur_time, "events[].occur_time")
                if e.HasField("occur_time")
                else 0.0,
                details=dict(e.details),
                source_epoch=e.source_epoch,
                source_sequence=e.source_sequence,
            )
            for e in request.events
        ]
        caller = peers.certificate_name(context)
        appended, duplicates = await asyncio.to_thread(self._log.append, events, caller)
        return ingest_pb.AppendAuditEventsResponse(
            appended_count=appended, duplicate_count=duplicates
        )


class AuditAdminServicer(admin_grpc.AuditAdminServiceServicer):
    def __init__(self, log: AuditLog) -> None:
        self._log = log

    async def VerifyAuditLog(
        self, request: admin_pb.VerifyAuditLogRequest, context: Context
    ) -> admin_pb.VerifyAuditLogResponse:
        try:
            result = await asyncio.to_thread(
                self._log.verify, request.start_sequence, request.max_events
            )
        except IntegrityError:
            metrics.AUDIT_VERIFY_FAILURES.inc()
            raise
        if not result.ok:
            metrics.AUDIT_VERIFY_FAILURES.inc()  # operators are alerted on this counter
        return admin_pb.VerifyAuditLogResponse(
            ok=result.ok,
            checked_count=result.checked,
            first_bad_sequence=result.first_bad_sequence,
            problem=result.problem,
            next_sequence=result.next_sequence,
            total_events=result.total,
        )

    async def GetAuditStats(
        self, request: admin_pb.GetAuditStatsRequest, context: Context
    ) -> admin_pb.GetAuditStatsResponse:
        counts = await asyncio.to_thread(self._log.counts)
        return admin_pb.GetAuditStatsResponse(
            total_events=sum(counts.values()), events_by_action=counts
        )
