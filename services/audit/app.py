"""Wiring of the audit service."""

from __future__ import annotations

from securemsg.audit.v1 import audit_admin_service_pb2_grpc as admin_grpc
from securemsg.audit.v1 import audit_ingest_service_pb2_grpc as ingest_grpc
from securemsg.audit.v1 import audit_service_pb2_grpc as pb_grpc

from services.audit import postgres_store
from services.audit.domain import AuditLog
from services.audit.model import AuditStore
from services.audit.postgres_store import PostgresAuditStore
from services.audit.servicer import AuditAdminServicer, AuditIngestServicer, AuditServicer
from services.audit.store import MIGRATIONS, SEALING, SqliteAuditStore
from services.common import catalog
from services.common.config import Env
from services.common.rotation import Rotatable
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
        postgres_migrations=postgres_store.MIGRATIONS,
    )
    store: AuditStore
    rotatable: list[Rotatable]
    if service.pg is not None:  # DATABASE_URL: any number of replicas
        pg_store = PostgresAuditStore(
            service.pg.database, service.keyring, fence=service.pg.rotation_lease.hold_in
        )
        store, rotatable = pg_store, list(pg_store.rotatables())
    else:
        sqlite_store = SqliteAuditStore(service.database, service.keyring)
        store, rotatable = sqlite_store, sqlite_store.rotatables()
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
        rotatable=rotatable,  # rotation is the concrete store's concern, not the protocol's
    )
