"""A fake of the audit log's store, chained with the real algorithm."""

from __future__ import annotations

import json
import threading

from services.audit import chain
from services.audit.chain import GENESIS, Chain, ChainedRow, Head, LinkedRow
from services.audit.model import NewEvent, Query, StoredEvent, Verification

_KEY = {1: bytes(32)}


class MemoryAuditStore:
    """`AuditStore` in a list. Rows are linked by services.audit.chain over their
    plaintext (nothing is encrypted here), so verify walks the same algorithm."""

    def __init__(self) -> None:
        self._rows: list[tuple[StoredEvent, LinkedRow]] = []
        self._ids: set[str] = set()
        self._chain = Chain(_KEY, 1)
        self._lock = threading.Lock()

    def append(self, events: list[NewEvent], now: float) -> tuple[int, int]:
        appended = duplicates = 0
        with self._lock:
            for event in events:
                if event.event_id in self._ids:
                    duplicates += 1
                    continue
                sequence = len(self._rows) + 1
                stored = StoredEvent(
                    sequence,
                    event.event_id,
                    event.action,
                    event.source,
                    event.user_id,
                    event.occur_time,
                    now,
                    dict(event.details),
                )
                row = ChainedRow(
                    sequence,
                    event.event_id,
                    event.action,
                    event.source,
                    event.user_id.encode() or None,
                    None,
                    json.dumps(event.details, sort_keys=True).encode(),
                    event.occur_time,
                    now,
                    event.source_epoch or None,
                    event.source_sequence or None,
                )
                previous = self._rows[-1][1].link if self._rows else GENESIS
                self._rows.append((stored, LinkedRow(row, self._chain.link(previous, row), 1)))
                self._ids.add(event.event_id)
                appended += 1
        return appended, duplicates

    def query(self, query: Query) -> list[StoredEvent]:
        def wanted(event: StoredEvent) -> bool:
            return (
                (query.user_id is None or event.user_id == query.user_id)
                and (query.action is None or event.action == query.action)
                and (query.start_time is None or event.occur_time >= query.start_time)
                and (query.end_time is None or event.occur_time < query.end_time)
                and (query.before_sequence is None or event.sequence < query.before_sequence)
            )

        with self._lock:
            events = [stored for stored, _ in reversed(self._rows)]
        return [e for e in events if wanted(e)][: query.limit]

    def verify(self, start: int = 1, limit: int = 0) -> Verification:
        start = max(start, 1)
        with self._lock:
            rows = [linked for _, linked in self._rows]
        previous = (
            GENESIS if start == 1 else rows[start - 2].link if start - 1 <= len(rows) else None
        )
        chosen = rows[start - 1 :]
        if limit > 0:
            chosen = chosen[:limit]
        head = Head(len(rows), rows[-1].link) if rows else None
        before: dict[tuple[str, str], int] = {}
        for linked in rows[: start - 1]:
            row = linked.row
            if row.source_epoch is not None and row.source_sequence is not None:
                key = (row.source, row.source_epoch)
                before[key] = max(before.get(key, 0), row.source_sequence)
        return chain.verify(
            self._chain,
            chosen,
            start=start,
            previous=previous,
            head=head,
            boundary=None,
            total=len(rows),
            limit=limit,
            numbering=chain.Numbering(before),
        )

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        with self._lock:
            for stored, _ in self._rows:
                counts[stored.action] = counts.get(stored.action, 0) + 1
        return counts
