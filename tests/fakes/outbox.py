"""A fake audit sink: what a component records outside any store change."""

from __future__ import annotations

from services.common.audit_events import AuditRecord


class RecordingAuditSink:
    """`AuditSink` that keeps each record in `events` (share the list with a fake store to
    see all of a service's audit events in order)."""

    def __init__(self, events: list[AuditRecord] | None = None) -> None:
        self.events = events if events is not None else []

    def record(self, record: AuditRecord) -> None:
        self.events.append(record)
