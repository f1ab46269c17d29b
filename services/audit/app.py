"""Wiring of the audit service."""

from __future__ import annotations

from securemsg.audit.v1 import audit_admin_service_pb2_grpc as admin_grpc
from securemsg.audit.v1 import audit_ingest_service_pb2_grpc as ingest_grpc
from securemsg.audit.v1 import audit_service_pb2_grpc as pb_grpc

from services.audit.domain import AuditLog
from services.audit.servicer import AuditAdminServicer, AuditIngestServicer, AuditServicer
from services.audit.store import MIGRATIONS, SEALING, SqliteAuditStore
from services.common import catalog
from services.common.config import Env
from services.common.server import App
from services.common.wiring import PersistentService, bind

SERVICE = "audit"


async def build(env: Env) -> App:
    service = PersistentService(
        SERVICE,
        env,
        MIGRATIONS,
        synchronous="FULL",  # an acknowledged event is deleted from the sender's outbox
        audit_outbox=False,  # no outbox of its own: key rotation is reported in its log file
        sealing=SEALING,
    )
    store = SqliteAuditStore(service.database, service.keyring)
    log = AuditLog(store, service.keyring.mac("audit/page_token"))
    return service.app(
        [
            bind(
                catalog.AUDIT,
                AuditServicer(log, service.channels.token_validator()),
                pb_grpc.add_AuditServiceServicer_to_server,
            ),
            bind(
                catalog.AUDIT_INGEST,
                AuditIngestServicer(log),
                ingest_grpc.add_AuditIngestServiceServicer_to_server,
            ),
            bind(
                catalog.AUDIT_ADMIN,
                AuditAdminServicer(log),
                admin_grpc.add_AuditAdminServiceServicer_to_server,
            ),
        ],
        rotatable=store.rotatables(),  # rotation is this store's concern, not the protocol's
    )
