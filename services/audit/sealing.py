"""How an audit event becomes a stored row and back: the same bytes on every backend.

The PostgreSQL store seals, opens and re-seals (key rotation) events here with the same
ciphers, blind index and associated data (row key: the event id) as the SQLite store, and
links rows with the same chain (services.audit.chain), so a log copied from SQLite into
PostgreSQL still verifies.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from services.audit.chain import ChainedRow, LinkedRow
from services.audit.model import NewEvent, StoredEvent
from services.common.crypto import Keyring

# Every column of audit_events, in the order rows are inserted.
COLUMNS = (
    "sequence",
    "event_id",
    "action",
    "source",
    "user_index",
    "user_id_ct",
    "details_ct",
    "occur_time",
    "record_time",
    "link",
    "chain_version",
    "source_epoch",
    "source_sequence",
)


def chained(row: Mapping[str, Any]) -> ChainedRow:
    """The bytes of a stored row that its link covers."""
    return ChainedRow(
        sequence=int(row["sequence"]),
        event_id=str(row["event_id"]),
        action=str(row["action"]),
        source=str(row["source"]),
        user_index=None if row["user_index"] is None else bytes(row["user_index"]),
        user_id_ct=None if row["user_id_ct"] is None else bytes(row["user_id_ct"]),
        details_ct=bytes(row["details_ct"]),
        occur_time=float(row["occur_time"]),
        record_time=float(row["record_time"]),
        source_epoch=row["source_epoch"],
        source_sequence=None if row["source_sequence"] is None else int(row["source_sequence"]),
    )


def linked(row: Mapping[str, Any]) -> LinkedRow:
    return LinkedRow(chained(row), bytes(row["link"]), int(row["chain_version"]))


class EventSealing:
    def __init__(self, keyring: Keyring) -> None:
        self.index = keyring.blind_index("audit_events.user_id")
        self.user_id = keyring.field("audit_events", "user_id")
        self.details = keyring.field("audit_events", "details")

    def seal(self, event: NewEvent, sequence: int, now: float) -> ChainedRow:
        """The stored form of a new event (its link is computed by the caller)."""
        row_key = event.event_id.encode()
        return ChainedRow(
            sequence=sequence,
            event_id=event.event_id,
            action=event.action,
            source=event.source,
            user_index=self.index(event.user_id) if event.user_id else None,
            user_id_ct=(
                self.user_id.encrypt_text(event.user_id, row_key) if event.user_id else None
            ),
            details_ct=self.details.encrypt_text(
                json.dumps(event.details, sort_keys=True), row_key
            ),
            occur_time=event.occur_time,
            record_time=now,
            source_epoch=event.source_epoch or None,
            source_sequence=event.source_sequence or None,
        )

    def open(self, row: Mapping[str, Any]) -> StoredEvent:
        row_key = str(row["event_id"]).encode()
        user_id_ct = row["user_id_ct"]
        return StoredEvent(
            sequence=int(row["sequence"]),
            event_id=str(row["event_id"]),
            action=str(row["action"]),
            source=str(row["source"]),
            user_id=self.user_id.decrypt_text(bytes(user_id_ct), row_key) if user_id_ct else "",
            occur_time=float(row["occur_time"]),
            record_time=float(row["record_time"]),
            details=json.loads(self.details.decrypt_text(bytes(row["details_ct"]), row_key)),
        )

    def reseal(self, row: ChainedRow) -> ChainedRow:
        """The same event under the primary key version (key rotation)."""
        row_key = row.event_id.encode()
        user_index, user_id_ct = row.user_index, row.user_id_ct
        if user_id_ct is not None:
            user_id = self.user_id.decrypt_text(user_id_ct, row_key)
            user_id_ct = self.user_id.encrypt_text(user_id, row_key)
            user_index = self.index(user_id)
        return ChainedRow(
            sequence=row.sequence,
            event_id=row.event_id,
            action=row.action,
            source=row.source,
            user_index=user_index,
            user_id_ct=user_id_ct,
            details_ct=self.details.reencrypt(row.details_ct, row_key, row_key),
            occur_time=row.occur_time,
            record_time=row.record_time,
            source_epoch=row.source_epoch,
            source_sequence=row.source_sequence,
        )
