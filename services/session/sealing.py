"""How a session becomes a row and back: the same bytes and MACs on every storage backend.

Both stores (SQLite and PostgreSQL) build, seal, check and open rows here, so a row copied
from one to the other still opens and its MAC still holds. The row key of the associated
data is the session id; the MAC (purpose key `mac/row/sessions`) covers every column but
the row id.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Any

from services.common.crypto import FieldCipher, Keyring, MacValue
from services.common.rotation import Reindex, RowLike
from services.session.model import Assurance, SessionRecord

TIMES = struct.Struct(">ddd")  # login time, absolute deadline, idle deadline
LEGACY_TIMES = struct.Struct(">dd")  # before row MACs: no idle deadline inside
# The plaintext expiry (for cleanup and a first filter) is rounded up to this, so that it
# is not the exact login time plus the idle timeout, which would link a row to its
# user_login event in audit.db. The exact deadline is in times_ct.
EXPIRY_STEP = 60.0


def coarse(expire_time: float) -> float:
    return math.ceil(expire_time / EXPIRY_STEP) * EXPIRY_STEP


def mac_values(row: RowLike) -> tuple[MacValue, ...]:
    return (
        row["session_id"],
        row["token_hash"],
        row["user_index"],
        row["expire_time"],
        row["user_id_ct"],
        row["ip_ct"],
        row["user_agent_ct"],
        row["times_ct"],
        row["assurance_ct"],
    )


def pack_assurance(value: Assurance) -> bytes:
    step_up = "" if value.step_up_time is None else repr(value.step_up_time)
    return f"{value.level}|{value.scope}|{step_up}".encode()


def unpack_assurance(raw: bytes) -> Assurance:
    level, scope, step_up = raw.decode().split("|")
    return Assurance(level, scope, float(step_up) if step_up else None)


class SessionSealing:
    """The ciphers and the row MAC of session's rows under one keyring."""

    def __init__(self, keyring: Keyring) -> None:
        self.index = keyring.blind_index("sessions.user_id")
        self.user_id = keyring.field("sessions", "user_id")
        self.ip = keyring.field("sessions", "ip_address")
        self.user_agent = keyring.field("sessions", "user_agent")
        self.times = keyring.field("sessions", "times")
        self.assurance = keyring.field("sessions", "assurance")
        self.mac = keyring.mac("row/sessions")

    def new_row(self, record: SessionRecord, token_hash: bytes) -> dict[str, Any]:
        """A new session's row, sealed (every column but the row id)."""
        row_key = record.session_id.encode()
        times = TIMES.pack(record.create_time, record.absolute_deadline, record.expire_time)
        row: dict[str, Any] = {
            "session_id": record.session_id,
            "token_hash": token_hash,
            "user_index": self.index(record.user_id),
            "user_id_ct": self.user_id.encrypt_text(record.user_id, row_key),
            "ip_ct": self.ip.encrypt_text(record.ip_address, row_key),
            "user_agent_ct": self.user_agent.encrypt_text(record.user_agent, row_key),
            "times_ct": self.times.encrypt(times, row_key),
            "expire_time": coarse(record.expire_time),
            "assurance_ct": self.assurance.encrypt(pack_assurance(record.assurance), row_key),
        }
        row["row_mac"] = self.mac.tag(*mac_values(row))
        return row

    def check(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The row as a dict, if its MAC binds all its columns together; IntegrityError
        otherwise."""
        values = dict(row)
        self.mac.check(values["row_mac"], *mac_values(values))
        return values

    def times_of(self, row: Mapping[str, Any]) -> tuple[float, float, float]:
        """(login time, absolute deadline, exact idle deadline)."""
        create_time, deadline, expire_time = TIMES.unpack(
            self.times.decrypt(row["times_ct"], row["session_id"].encode())
        )
        return create_time, deadline, expire_time

    def slid(self, row: Mapping[str, Any], expire_time: float) -> dict[str, Any]:
        """The columns that set a session's idle deadline to `expire_time`."""
        create_time, deadline, _ = self.times_of(row)
        times = TIMES.pack(create_time, deadline, expire_time)
        return {
            "times_ct": self.times.encrypt(times, row["session_id"].encode()),
            "expire_time": coarse(expire_time),
        }

    def seal_assurance(self, session_id: str, assurance: Assurance) -> bytes:
        return self.assurance.encrypt(pack_assurance(assurance), session_id.encode())

    def open(self, row: Mapping[str, Any]) -> SessionRecord:
        """The session in a checked row."""
        row_key = row["session_id"].encode()
        create_time, deadline, expire_time = self.times_of(row)
        sealed = row["assurance_ct"]
        return SessionRecord(
            session_id=row["session_id"],
            user_id=self.user_id.decrypt_text(row["user_id_ct"], row_key),
            ip_address=self.ip.decrypt_text(row["ip_ct"], row_key),
            user_agent=self.user_agent.decrypt_text(row["user_agent_ct"], row_key),
            create_time=create_time,
            absolute_deadline=deadline,
            expire_time=expire_time,
            # Sessions stored before assurance levels existed read as the defaults.
            assurance=(
                Assurance()
                if sealed is None
                else unpack_assurance(self.assurance.decrypt(sealed, row_key))
            ),
        )

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
