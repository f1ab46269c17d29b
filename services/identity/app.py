"""Wiring of the identity service: configuration, storage, servicers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from securemsg.identity.v1 import identity_admin_service_pb2_grpc as admin_grpc
from securemsg.identity.v1 import identity_internal_service_pb2_grpc as internal_grpc
from securemsg.identity.v1 import identity_service_pb2_grpc as pb_grpc

from services.common import catalog, shared_state
from services.common.addresses import ClientAddresses
from services.common.config import Env
from services.common.errors import Unavailable
from services.common.ratelimit import CounterFactory, local_counters
from services.common.rotation import Rotatable
from services.common.server import App
from services.common.wiring import PersistentService, bind
from services.identity import postgres_store
from services.identity.cache import DEFAULT_MAX_ENTRIES, CachedIdentityStore
from services.identity.domain import Identity, IdentityLimits
from services.identity.factor_store import SqliteFactorStore
from services.identity.factors import FactorLimits, Factors
from services.identity.model import FactorStore, IdentityStore
from services.identity.passwords import HashParameters, PasswordHasher
from services.identity.postgres_factors import PostgresFactorStore
from services.identity.postgres_store import PostgresIdentityStore
from services.identity.servicer import (
    IdentityAdminServicer,
    IdentityInternalServicer,
    IdentityServicer,
)
from services.identity.session_client import RemoteSessionRevoker
from services.identity.store import MIGRATIONS, SEALING, SqliteIdentityStore

SERVICE = "identity"
logger = logging.getLogger(__name__)


async def build(env: Env) -> App:
    service = PersistentService(
        SERVICE,
        env,
        MIGRATIONS,
        synchronous="FULL",  # an acknowledged registration must survive power loss
        audit_outbox=True,
        sealing=SEALING,
        postgres_migrations=postgres_store.MIGRATIONS,
        postgres_sealing=postgres_store.SEALING,
    )
    store: IdentityStore
    factor_store: FactorStore
    rotatable: list[Rotatable]
    published: CachedIdentityStore | None = None
    if service.pg is not None:  # DATABASE_URL: any number of replicas, so no account cache
        pg_users = PostgresIdentityStore(service.pg.database, service.keyring, service.pg_outbox)
        pg_factors = PostgresFactorStore(service.pg.database, service.keyring, service.pg_outbox)
        store, factor_store = pg_users, pg_factors
        rotatable = [*pg_users.rotatables(), pg_factors.rotatable()]
    else:
        sqlite_store = SqliteIdentityStore(service.database, service.keyring, service.outbox)
        # The database file is this process's alone (locked), so every change passes
        # through the cache: key bundles may read accounts from memory
        # (services/identity/cache.py).
        store = published = CachedIdentityStore(
            sqlite_store, env.integer("IDENTITY_CACHE_ENTRIES", DEFAULT_MAX_ENTRIES, minimum=0)
        )
        factors_ = SqliteFactorStore(service.database, service.keyring, service.outbox)
        factor_store = factors_
        rotatable = [*sqlite_store.rotatables(), factors_.rotatable()]
    windows, close_shared = await shared_limits(env, service)
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
        service.audit_outbox,
        limits=FactorLimits(
            code_failures_per_account=env.integer(
                "SECOND_FACTOR_FAILURES_PER_ACCOUNT", 10, minimum=1
            ),
            password_budget=env.integer("PASSWORD_BUDGET", 10, minimum=1),
            password_budget_window=env.number(
                "PASSWORD_BUDGET_WINDOW_SECONDS", 86400.0, minimum=1.0
            ),
        ),
        windows=windows,
    )
    identity = Identity(
        store,
        RemoteSessionRevoker(service.channels.to("session")),
        limits=IdentityLimits(
            registrations_per_minute=env.integer("REGISTRATIONS_PER_MINUTE", 60, minimum=1),
            bundles_per_minute=env.integer("KEY_BUNDLES_PER_MINUTE", 600, minimum=1),
            prekeys_per_target_per_hour=env.integer(
                "ONE_TIME_PREKEYS_PER_TARGET_PER_HOUR", 10, minimum=1
            ),
        ),
        on_login=factors.refill_password_budget,
        published=published,
        windows=windows,
    )
    retry_seconds = env.number("REVOCATION_RETRY_SECONDS", 1.0, minimum=0.05)

    async def revoke_forever() -> None:
        """Finishes the revocations that deactivations could not do at once."""
        backoff = retry_seconds
        while True:
            try:
                await identity.revoke_pending()
                backoff = retry_seconds
            except Unavailable:
                backoff = min(backoff * 2, 5.0)
            except Exception:
                logger.exception("revoking sessions of deactivated accounts failed; will retry")
                backoff = min(backoff * 2, 5.0)
            await asyncio.sleep(backoff)

    return service.app(
        [
            bind(
                catalog.IDENTITY,
                IdentityServicer(
                    identity,
                    factors,
                    service.channels.token_validator(),
                    ClientAddresses.from_env(env),
                ),
                pb_grpc.add_IdentityServiceServicer_to_server,
            ),
            bind(
                catalog.IDENTITY_INTERNAL,
                IdentityInternalServicer(identity, factors),
                internal_grpc.add_IdentityInternalServiceServicer_to_server,
            ),
            bind(
                catalog.IDENTITY_ADMIN,
                IdentityAdminServicer(identity, service.audit_outbox.backlog),
                admin_grpc.add_IdentityAdminServiceServicer_to_server,
            ),
        ],
        # Rotation is a concern of these SQLite stores, not of the store protocols.
        rotatable=rotatable,
        background=[revoke_forever],
        on_stop=[close_shared],
    )


async def shared_limits(
    env: Env, service: PersistentService
) -> tuple[CounterFactory, Callable[[], Awaitable[None]]]:
    """The limits' windows, and what closes them: in Redis when REDIS_URL is set, so that
    N replicas allow what one would (the 11th wrong code is refused wherever it lands);
    else in this process's memory."""
    shared = await shared_state.open_from_env(env, service.keyring, "identity:")
    if shared is None:

        async def nothing() -> None:
            return None

        return local_counters(time.time), nothing
    client, names = shared
    logger.info("identity's limits in redis, shared by every identity replica")
    # The rules run in worker threads; the client belongs to this (the serving) loop.
    return shared_state.thread_counters(client, names, asyncio.get_running_loop()), client.aclose
