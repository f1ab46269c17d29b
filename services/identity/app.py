"""Wiring of the identity service: configuration, storage, servicers, access rules."""

from __future__ import annotations

from securemsg.identity.v1 import identity_admin_service_pb2_grpc as admin_grpc
from securemsg.identity.v1 import identity_internal_service_pb2_grpc as internal_grpc
from securemsg.identity.v1 import identity_service_pb2_grpc as pb_grpc

from services.common import database_admin, peers
from services.common.addresses import ClientAddresses
from services.common.auth import RemoteTokenValidator
from services.common.channels import open_channel
from services.common.config import Env, internal_port, tls_from_env
from services.common.outbox import OutboxShipper, SqliteOutbox
from services.common.rotation import rotation_from_env
from services.common.server import App, ServiceBinding
from services.common.sqlite import open_service_database
from services.identity.domain import Identity, IdentityLimits
from services.identity.factor_store import SqliteFactorStore
from services.identity.factors import FactorLimits, Factors
from services.identity.passwords import HashParameters, PasswordHasher
from services.identity.servicer import (
    IdentityAdminServicer,
    IdentityInternalServicer,
    IdentityServicer,
)
from services.identity.session_client import RemoteSessionRevoker
from services.identity.store import MIGRATIONS, SqliteIdentityStore

SERVICE = "identity"
PACKAGE = "securemsg.identity.v1"


async def build(env: Env) -> App:
    opened = open_service_database(
        SERVICE,
        env,
        MIGRATIONS,
        synchronous="FULL",  # an acknowledged registration must survive power loss
    )
    outbox = SqliteOutbox(opened.database, opened.keyring, SERVICE)
    shipper = OutboxShipper.from_env(outbox, env)
    store = SqliteIdentityStore(opened.database, opened.keyring, outbox)
    factor_store = SqliteFactorStore(opened.database, opened.keyring, outbox)
    # Rotation is a concern of this SQLite store, not of the store protocol.
    rotation = rotation_from_env(
        opened.database,
        opened.keyring,
        [*store.rotatables(), factor_store.rotatable(), outbox.rotatable()],
        outbox,
        env.number,
    )
    factors = Factors(
        factor_store,
        store,
        PasswordHasher(
            HashParameters(
                time_cost=env.integer("PASSWORD_HASH_TIME_COST", 2, minimum=1),
                memory_kib=env.integer("PASSWORD_HASH_MEMORY_KIB", 19456, minimum=8),
                parallelism=env.integer("PASSWORD_HASH_PARALLELISM", 1, minimum=1),
            )
        ),
        outbox,
        limits=FactorLimits(
            code_failures_per_account=env.integer(
                "SECOND_FACTOR_FAILURES_PER_ACCOUNT", 10, minimum=1
            ),
            password_budget=env.integer("PASSWORD_BUDGET", 10, minimum=1),
            password_budget_window=env.number(
                "PASSWORD_BUDGET_WINDOW_SECONDS", 86400.0, minimum=1.0
            ),
        ),
    )
    session_channel = open_channel(
        env.string("SESSION_INTERNAL_ADDRESS", f"127.0.0.1:{internal_port('session')}"),
        tls_from_env(env),
    )
    identity = Identity(
        store,
        RemoteSessionRevoker(session_channel),
        limits=IdentityLimits(
            registrations_per_minute=env.integer("REGISTRATIONS_PER_MINUTE", 60, minimum=1),
            bundles_per_minute=env.integer("KEY_BUNDLES_PER_MINUTE", 600, minimum=1),
            prekeys_per_target_per_hour=env.integer(
                "ONE_TIME_PREKEYS_PER_TARGET_PER_HOUR", 10, minimum=1
            ),
        ),
        on_login=factors.refill_password_budget,
    )

    async def close() -> None:
        await shipper.close()
        await session_channel.close(grace=None)
        opened.database.close()

    return App(
        bindings=[
            ServiceBinding(
                f"{PACKAGE}.IdentityService",
                IdentityServicer(
                    identity,
                    factors,
                    RemoteTokenValidator(
                        session_channel, cache_seconds=env.number("TOKEN_CACHE_SECONDS", 2.0)
                    ),
                    ClientAddresses.from_env(env),
                ),
                pb_grpc.add_IdentityServiceServicer_to_server,
            ),
            ServiceBinding(
                f"{PACKAGE}.IdentityInternalService",
                IdentityInternalServicer(identity, factors),
                internal_grpc.add_IdentityInternalServiceServicer_to_server,
                allowed_callers=frozenset({"session", "relay"}),
            ),
            ServiceBinding(
                f"{PACKAGE}.IdentityAdminService",
                IdentityAdminServicer(identity, outbox.backlog),
                admin_grpc.add_IdentityAdminServiceServicer_to_server,
                allowed_callers=frozenset({peers.OPERATOR}),
            ),
            database_admin.binding(SERVICE, opened.database, rotation),
        ],
        background=[rotation.run, shipper.run],
        on_stop=[close],
    )
