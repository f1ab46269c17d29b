"""Every proto service of the deployment: which process hosts it and who may call it.

Written once, here. The wiring binds servicers by these entries, the server's
interceptor enforces their allow-lists, the launcher takes health names from them, and
the tests build their authorization matrix from them (and check docs/ARCHITECTURE.md's
table against them). Names come from the generated descriptors, never from strings.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.descriptor import ServiceDescriptor
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

from services.common.peers import OPERATOR
from services.protocol.ports import PERSISTENT, SERVICES


@dataclass(frozen=True)
class Api:
    """A proto service as deployed: its host and the certificate names allowed to call it
    (None: public, end users authenticated per call)."""

    descriptor: ServiceDescriptor
    host: str
    callers: frozenset[str] | None

    @property
    def full_name(self) -> str:
        return str(self.descriptor.full_name)


def _api(module: object, name: str, host: str, *callers: str) -> Api:
    descriptor = module.DESCRIPTOR.services_by_name[name]  # type: ignore[attr-defined]
    return Api(descriptor, host, frozenset(callers) if callers else None)


IDENTITY = _api(identity_service_pb2, "IdentityService", "identity")
IDENTITY_INTERNAL = _api(
    identity_internal_service_pb2, "IdentityInternalService", "identity", "session", "relay"
)
IDENTITY_ADMIN = _api(identity_admin_service_pb2, "IdentityAdminService", "identity", OPERATOR)
SESSION = _api(session_service_pb2, "SessionService", "session")
SESSION_INTERNAL = _api(
    session_internal_service_pb2, "SessionInternalService", "session", "identity", "relay", "audit"
)
# identity: revoking a deactivated account's sessions.
SESSION_ADMIN = _api(
    session_admin_service_pb2, "SessionAdminService", "session", "identity", OPERATOR
)
RELAY = _api(relay_service_pb2, "RelayService", "relay")
RELAY_ADMIN = _api(relay_admin_service_pb2, "RelayAdminService", "relay", OPERATOR)
AUDIT = _api(audit_service_pb2, "AuditService", "audit")
# An event's source must also match the caller (checked by the audit domain).
AUDIT_INGEST = _api(
    audit_ingest_service_pb2, "AuditIngestService", "audit", "identity", "session", "relay"
)
AUDIT_ADMIN = _api(audit_admin_service_pb2, "AuditAdminService", "audit", OPERATOR)


def database_admin(host: str) -> Api:
    """Backups and key rotation status, served by each persistent service."""
    assert host in PERSISTENT, host
    return _api(database_admin_service_pb2, "DatabaseAdminService", host, OPERATOR)


APIS: tuple[Api, ...] = (
    IDENTITY,
    IDENTITY_INTERNAL,
    IDENTITY_ADMIN,
    SESSION,
    SESSION_INTERNAL,
    SESSION_ADMIN,
    RELAY,
    RELAY_ADMIN,
    AUDIT,
    AUDIT_INGEST,
    AUDIT_ADMIN,
    *(database_admin(host) for host in PERSISTENT),
)


def public_api(host: str) -> Api:
    """A service's public API (its health name in make run and compose)."""
    (api,) = [a for a in APIS if a.host == host and a.callers is None]
    return api


def peers_of(caller: str) -> tuple[str, ...]:
    """The services whose internal APIs `caller` may call (so must be able to reach)."""
    return tuple(
        host
        for host in SERVICES
        if host != caller
        and any(a.host == host and a.callers and caller in a.callers for a in APIS)
    )
