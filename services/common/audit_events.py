"""The audit event vocabulary and how producers describe an event.

Documented for people in docs/AUDIT_EVENTS.md and in audit_event.proto; this module is
the one place code takes the names from.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from securemsg.audit.v1 import audit_event_pb2

from services.common import convert
from services.protocol.ports import SERVICES

USER_REGISTERED = "user_registered"
USER_DEACTIVATED = "user_deactivated"
PREKEYS_UPLOADED = "prekeys_uploaded"
SIGNED_PREKEY_ROTATED = "signed_prekey_rotated"
USER_LOGIN = "user_login"
USER_LOGIN_FAILED = "user_login_failed"
USER_LOGOUT = "user_logout"
SESSIONS_REVOKED = "sessions_revoked"
RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"
AUTH_FAILED = "auth_failed"
CAPACITY_EXCEEDED = "capacity_exceeded"
KEY_ROTATION_COMPLETED = "key_rotation_completed"
TOTP_ENROLLMENT_STARTED = "totp_enrollment_started"
TOTP_ENABLED = "totp_enabled"
TOTP_REMOVED = "totp_removed"
SECOND_FACTOR_FAILED = "second_factor_failed"
RECOVERY_CODE_USED = "recovery_code_used"
RECOVERY_CODES_GENERATED = "recovery_codes_generated"
PASSWORD_SET = "password_set"  # noqa: S105 (an event name)
PASSWORD_REHASHED = "password_rehashed"  # noqa: S105
KEYS_REPLACED = "keys_replaced"
SESSION_STEPPED_UP = "session_stepped_up"
RECOVERY_LOGIN = "recovery_login"

VOCABULARY = frozenset(
    {
        USER_REGISTERED,
        USER_DEACTIVATED,
        PREKEYS_UPLOADED,
        SIGNED_PREKEY_ROTATED,
        USER_LOGIN,
        USER_LOGIN_FAILED,
        USER_LOGOUT,
        SESSIONS_REVOKED,
        RATE_LIMIT_EXCEEDED,
        AUTH_FAILED,
        CAPACITY_EXCEEDED,
        KEY_ROTATION_COMPLETED,
        TOTP_ENROLLMENT_STARTED,
        TOTP_ENABLED,
        TOTP_REMOVED,
        SECOND_FACTOR_FAILED,
        RECOVERY_CODE_USED,
        RECOVERY_CODES_GENERATED,
        PASSWORD_SET,
        PASSWORD_REHASHED,
        KEYS_REPLACED,
        SESSION_STEPPED_UP,
        RECOVERY_LOGIN,
    }
)

SOURCES = frozenset(SERVICES)


@dataclass(frozen=True)
class AuditRecord:
    """An event as a producer states it; id and time are fixed when it is created."""

    action: str
    user_id: str = ""
    details: Mapping[str, str] = field(default_factory=dict)
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    occur_time: float = field(default_factory=time.time)

    def to_proto(self, source: str) -> audit_event_pb2.AuditEvent:
        assert self.action in VOCABULARY, self.action
        return audit_event_pb2.AuditEvent(
            event_id=self.event_id,
            action=self.action,
            source=source,
            user_id=self.user_id,
            occur_time=convert.timestamp(self.occur_time),
            details=dict(self.details),
        )


class AuditSink(Protocol):
    """Where a component records an audit event that goes with no other change."""

    def record(self, record: AuditRecord) -> None: ...
