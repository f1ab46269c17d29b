"""Wiring of the session service: configuration, storage, login, background cleanup.

Login challenges and login limits live in this process's memory, or with `REDIS_URL` in
Redis, shared by every session replica (a challenge issued by one is redeemed by another,
once; the 11th failure is refused whichever replica sees it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from securemsg.session.v1 import session_admin_service_pb2_grpc as admin_grpc
from securemsg.session.v1 import session_internal_service_pb2_grpc as internal_grpc
from securemsg.session.v1 import session_service_pb2_grpc as pb_grpc

from services.common import catalog, shared_state
from services.common.addresses import ClientAddresses
from services.common.config import Env
from services.common.crypto import Keyring
from services.common.identity_client import RemoteIdentityDirectory
from services.common.ratelimit import WindowFactory, WindowLimit, local_windows
from services.common.rotation import Rotatable
from services.common.server import App
from services.common.wiring import PersistentService, bind
from services.session import postgres_store
from services.session.cache import DEFAULT_MAX_ENTRIES, CachedSessionStore
from services.session.login import ChallengeBook, Challenges, Login, LoginLimits
from services.session.postgres_store import PostgresSessionStore
from services.session.recovery import PasswordLimits, PasswordLogin
from services.session.redis_challenges import RedisChallengeBook
from services.session.servicer import (
    SessionAdminServicer,
    SessionInternalServicer,
    SessionServicer,
)
from services.session.sessions import SessionPolicy, Sessions
from services.session.store import MIGRATIONS, SEALING, SqliteSessionStore

SERVICE = "session"
logger = logging.getLogger(__name__)


async def build(env: Env) -> App:
    service = PersistentService(
        SERVICE,
        env,
        MIGRATIONS,
        # A session lost to power failure costs a re-login, not data: NORMAL still
        # survives a process crash (the WAL is in the OS cache) and saves an fsync per login.
        synchronous="NORMAL",
        audit_outbox=True,
        sealing=SEALING,
        postgres_migrations=postgres_store.MIGRATIONS,
        postgres_sealing=postgres_store.SEALING,
    )
    policy = SessionPolicy(
        idle_timeout=env.number("SESSION_IDLE_TIMEOUT_SECONDS", 1800.0, minimum=1.0),
        max_lifetime=env.number("SESSION_MAX_LIFETIME_SECONDS", 12 * 3600.0, minimum=1.0),
        step_up_max_age=env.number("STEP_UP_MAX_AGE_SECONDS", 600.0, minimum=1.0),
        recovery_lifetime=env.number("RECOVERY_SESSION_SECONDS", 900.0, minimum=1.0),
    )
    rotatable: list[Rotatable]
    if service.pg is not None:  # DATABASE_URL: any number of replicas, so no session cache
        pg_store = PostgresSessionStore(service.pg.database, service.keyring, service.pg_outbox)
        rotatable = list(pg_store.rotatables())
        sessions = Sessions(pg_store, policy)
    else:
        sqlite_store = SqliteSessionStore(service.database, service.keyring, service.outbox)
        rotatable = list(sqlite_store.rotatables())
        # The database file is this process's alone (locked), so every change passes
        # through the cache: it may answer validations from memory (services/session/cache.py).
        cached = CachedSessionStore(
            sqlite_store, env.integer("SESSION_CACHE_ENTRIES", DEFAULT_MAX_ENTRIES, minimum=0)
        )
        sessions = Sessions(cached, policy, memo=cached)
    limits = LoginLimits(
        failures_per_account_address=env.integer(
            "LOGIN_MAX_FAILURES_PER_ACCOUNT_ADDRESS", 10, minimum=1
        ),
        failures_per_address=env.integer("LOGIN_MAX_FAILURES_PER_ADDRESS", 100, minimum=1),
        window_seconds=env.number("LOGIN_FAILURE_WINDOW_SECONDS", 900.0, minimum=1.0),
        challenges_per_address_per_minute=env.integer(
            "LOGIN_CHALLENGES_PER_MINUTE", 120, minimum=1
        ),
    )
    challenge_ttl = env.number("CHALLENGE_TTL_SECONDS", 60.0, minimum=1.0)
    challenges, windows, close_shared = await shared_login_state(
        env,
        service.keyring,
        ttl=challenge_ttl,
        capacity=env.integer("LOGIN_MAX_PENDING_CHALLENGES", 100_000, minimum=1),
        # What the per-minute rate lets one address hold anyway; under pressure less.
        per_group=max(1, int(limits.challenges_per_address_per_minute * challenge_ttl / 60)),
    )
    directory = RemoteIdentityDirectory(service.channels.to("identity"))
    login = Login(sessions, directory, challenges, limits, service.audit_outbox, windows=windows)
    password_login = PasswordLogin(
        sessions,
        directory,
        PasswordLimits(
            failures_per_account_address=env.integer(
                "PASSWORD_LOGIN_FAILURES_PER_ACCOUNT_ADDRESS", 5, minimum=1
            ),
            failures_per_address=env.integer("PASSWORD_LOGIN_FAILURES_PER_ADDRESS", 30, minimum=1),
            window_seconds=env.number("LOGIN_FAILURE_WINDOW_SECONDS", 900.0, minimum=1.0),
        ),
        service.audit_outbox,
        windows,
    )
    interval = env.number("CLEANUP_INTERVAL_SECONDS", 60.0, minimum=0.1)

    async def cleanup_once(when: str) -> None:
        deleted = await asyncio.to_thread(sessions.cleanup)
        logger.info("expired sessions removed", extra={"fields": {"count": deleted, "at": when}})

    await cleanup_once("start")

    async def cleanup_forever() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await cleanup_once("interval")
            except Exception:
                logger.exception("session cleanup failed; will retry")

    async def cleanup_at_shutdown() -> None:
        await cleanup_once("shutdown")
        await close_shared()

    return service.app(
        [
            bind(
                catalog.SESSION,
                SessionServicer(sessions, login, password_login, ClientAddresses.from_env(env)),
                pb_grpc.add_SessionServiceServicer_to_server,
            ),
            bind(
                catalog.SESSION_INTERNAL,
                SessionInternalServicer(sessions),
                internal_grpc.add_SessionInternalServiceServicer_to_server,
            ),
            bind(
                catalog.SESSION_ADMIN,
                SessionAdminServicer(sessions, login, service.audit_outbox.backlog),
                admin_grpc.add_SessionAdminServiceServicer_to_server,
            ),
        ],
        rotatable=rotatable,  # rotation is the concrete store's concern, not the protocol's
        background=[cleanup_forever],
        on_stop=[cleanup_at_shutdown],
    )


async def shared_login_state(
    env: Env, keyring: Keyring, *, ttl: float, capacity: int, per_group: int
) -> tuple[Challenges, WindowFactory, Callable[[], Awaitable[None]]]:
    """The challenge book and the limits' windows: in Redis when REDIS_URL is set, else in
    memory; and what closes them."""
    shared = await shared_state.open_from_env(env, keyring, "session:")
    if shared is None:

        async def nothing() -> None:
            return None

        return (
            ChallengeBook(ttl=ttl, capacity=capacity, per_group=per_group),
            local_windows(),
            nothing,
        )
    client, names = shared

    def window(name: str, limit: int, seconds: float) -> WindowLimit:
        return shared_state.SharedWindowLimiter(client, names, name, limit, seconds)

    logger.info("login challenges and limits in redis, shared by every session replica")
    book = RedisChallengeBook(client, names, ttl, capacity=capacity, per_group=per_group)
    return book, window, client.aclose
