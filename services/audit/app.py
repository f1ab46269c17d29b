"""Wiring of the audit service."""

from __future__ import annotations

from securemsg.audit.v1 import audit_admin_service_pb2_grpc as admin_grpc
from securemsg.audit.v1 import audit_ingest_service_pb2_grpc as ingest_grpc
from securemsg.audit.v1 import audit_service_pb2_grpc as pb_grpc

from services.audit.domain import AuditLog
from services.audit.servicer import AuditAdminServicer, AuditIngestServicer, AuditServicer
from services.audit.store import MIGRATIONS, SqliteAuditStore
from services.common import database_admin, peers
from services.common.auth import RemoteTokenValidator
from services.common.channels import open_channel
from services.common.config import Env, internal_port, tls_from_env
from services.common.rotation import rotation_from_env
from services.common.server import App, ServiceBinding
from services.common.sqlite import open_service_database

SERVICE = "audit"
PACKAGE = "securemsg.audit.v1"


async def build(env: Env) -> App:
    opened = open_service_database(
        SERVICE,
        env,
        MIGRATIONS,
        synchronous="FULL",  # an acknowledged event is deleted from the sender's outbox
    )
    store = SqliteAuditStore(opened.database, opened.keyring)
    log = AuditLog(store, opened.keyring.mac("audit/page_token"))
    # The audit service has no outbox of its own: its rotation is in its log file.
    rotation = rotation_from_env(
        opened.database, opened.keyring, store.rotatables(), None, env.number
    )
    tls = tls_from_env(env)
    session_channel = open_channel(
        env.string("SESSION_INTERNAL_ADDRESS", f"127.0.0.1:{internal_port('session')}"), tls
    )

    async def close() -> None:
        await session_channel.close(grace=None)
        opened.database.close()

    return App(
        bindings=[
            ServiceBinding(
                f"{PACKAGE}.AuditService",
                AuditServicer(
                    log,
                    RemoteTokenValidator(
                        session_channel, cache_seconds=env.number("TOKEN_CACHE_SECONDS", 2.0)
                    ),
                ),
                pb_grpc.add_AuditServiceServicer_to_server,
            ),
            ServiceBinding(
                f"{PACKAGE}.AuditIngestService",
                AuditIngestServicer(log),
                ingest_grpc.add_AuditIngestServiceServicer_to_server,
                allowed_callers=frozenset({"identity", "session", "relay"}),
            ),
            ServiceBinding(
                f"{PACKAGE}.AuditAdminService",
                AuditAdminServicer(log),
                admin_grpc.add_AuditAdminServiceServicer_to_server,
                allowed_callers=frozenset({peers.OPERATOR}),
            ),
            database_admin.binding(SERVICE, opened.database, rotation),
        ],
        background=[rotation.run],
        on_stop=[close],
    )
