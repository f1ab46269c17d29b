"""How a session becomes columns and back: the same bytes on every storage backend.

Both stores (SQLite and PostgreSQL) seal and open sessions here, so a row copied from one
to the other decrypts unchanged. The row key of the associated data is the session id.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

from services.common.crypto import FieldCipher, Keyring
from services.common.rotation import Reindex
from services.session.model import Assurance, SessionRecord

_TIMES = struct.Struct(">dd")  # login time, absolute deadline

# Columns written when a session is created, in this order (see `SessionSealing.seal`).
INSERT_COLUMNS = (
    "session_id",
    "token_hash",
    "user_index",
    "user_id_ct",
    "ip_ct",
    "user_agent_ct",
    "times_ct",
    "expire_time",
    "assurance_ct",
)


def pack_assurance(value: Assurance) -> bytes:
    step_up = "" if value.step_up_time is None else repr(value.step_up_time)
    return f"{value.level}|{value.scope}|{step_up}".encode()


def unpack_assurance(raw: bytes) -> Assurance:
    level, scope, step_up = raw.decode().split("|")
    return Assurance(level, scope, float(step_up) if step_up else None)


class SessionSealing:
    def __init__(self, keyring: Keyring) -> None:
        self.index = keyring.blind_index("sessions.user_id")
        self.user_id = keyring.field("sessions", "user_id")
        self.ip = keyring.field("sessions", "ip_address")
        self.user_agent = keyring.field("sessions", "user_agent")
        self.times = keyring.field("sessions", "times")
        self.assurance = keyring.field("sessions", "assurance")

    def seal(self, record: SessionRecord, token_hash: bytes) -> tuple[object, ...]:
        """Values for INSERT_COLUMNS."""
        row_key = record.session_id.encode()
        return (
            record.session_id,
            token_hash,
            self.index(record.user_id),
            self.user_id.encrypt_text(record.user_id, row_key),
            self.ip.encrypt_text(record.ip_address, row_key),
            self.user_agent.encrypt_text(record.user_agent, row_key),
            self.times.encrypt(_TIMES.pack(record.create_time, record.absolute_deadline), row_key),
            record.expire_time,
            self.assurance.encrypt(pack_assurance(record.assurance), row_key),
        )

    def open(self, row: Mapping[str, Any]) -> SessionRecord:
        row_key = str(row["session_id"]).encode()
        create_time, deadline = _TIMES.unpack(self.times.decrypt(bytes(row["times_ct"]), row_key))
        sealed = row["assurance_ct"]
        return SessionRecord(
            session_id=str(row["session_id"]),
            user_id=self.user_id.decrypt_text(bytes(row["user_id_ct"]), row_key),
            ip_address=self.ip.decrypt_text(bytes(row["ip_ct"]), row_key),
            user_agent=self.user_agent.decrypt_text(bytes(row["user_agent_ct"]), row_key),
            create_time=create_time,
            absolute_deadline=deadline,
            expire_time=float(row["expire_time"]),
            # Sessions stored before assurance levels existed read as the defaults.
            assurance=(
                Assurance()
                if sealed is None
                else unpack_assurance(self.assurance.decrypt(bytes(sealed), row_key))
            ),
        )

    def seal_assurance(self, session_id: str, assurance: Assurance) -> bytes:
        return self.assurance.encrypt(pack_assurance(assurance), session_id.encode())

    def encrypted_fields(self) -> list[tuple[str, FieldCipher]]:
        return [
            ("user_id_ct", self.user_id),
            ("ip_ct", self.ip),
            ("user_agent_ct", self.user_agent),
            ("times_ct", self.times),
            ("assurance_ct", self.assurance),
        ]

    def reindex(self) -> Reindex:
        return Reindex("user_index", self.index, "user_id_ct")


def newest_first(records: list[SessionRecord]) -> list[SessionRecord]:
    """Login times are encrypted, so the order is made here rather than in SQL."""
    return sorted(records, key=lambda r: (r.create_time, r.session_id), reverse=True)
