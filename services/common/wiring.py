"""Wiring shared by the services' app.py: binding servicers by catalog entry, and what
every persistent service opens (database, keyring, audit outbox and its shipper, key
rotation, channels to its peers) and closes again."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import grpc

from services.common import database_admin
from services.common.auth import RemoteTokenValidator
from services.common.catalog import Api
from services.common.channels import peer_channel
from services.common.config import Env
from services.common.crypto import Keyring
from services.common.outbox import OutboxShipper, SqliteOutbox
from services.common.postgres.config import PostgresConfig
from services.common.postgres.keys import PgRowSealing
from services.common.postgres.outbox import PgOutbox
from services.common.postgres.service import PgService, open_pg_service
from services.common.rotation import Rotatable, rotation_from_env
from services.common.schema import Migration
from services.common.server import App, ServiceBinding
from services.common.sqlite import Database, RowSealing, Synchronous, open_service_database
from services.common.storage import BackgroundRotation, DurableOutbox

Job = Callable[[], Coroutine[Any, Any, None]]
Hook = Callable[[], Awaitable[None]]


def bind(
    api: Api, servicer: Any, add_to_server: Callable[[Any, grpc.aio.Server], None]
) -> ServiceBinding:
    """Hosts `servicer` as `api`, under the catalog's allow-list."""
    return ServiceBinding(api.full_name, servicer, add_to_server, allowed_callers=api.callers)


class Channels:
    """Channels to peers, opened once each and closed together."""

    def __init__(self, env: Env) -> None:
        self._env = env
        self._open: dict[str, grpc.aio.Channel] = {}

    def to(self, peer: str) -> grpc.aio.Channel:
        if peer not in self._open:
            self._open[peer] = peer_channel(self._env, peer)
        return self._open[peer]

    def token_validator(self) -> RemoteTokenValidator:
        """Bearer tokens checked by the session service, successes cached for
        TOKEN_CACHE_SECONDS (the documented revocation bound)."""
        return RemoteTokenValidator(
            self.to("session"), cache_seconds=self._env.number("TOKEN_CACHE_SECONDS", 2.0)
        )

    async def close(self) -> None:
        for channel in self._open.values():
            await channel.close(grace=None)


class PersistentService:
    """A service with its own encrypted database: open it with `open`, build servicers on
    `database`/`keyring`/`outbox`, and hand everything over with `app`.

    Given `postgres_migrations`, the service runs on PostgreSQL when DATABASE_URL (or
    DATABASE_URL_FILE) is set: `pg` is then its database (build the PostgreSQL stores on
    `pg.database`, `keyring`, `pg_outbox`), key rotation runs under a lease and backups go
    through pg_dump. Otherwise it is the SQLite file in DB_PATH, as before.
    """

    def __init__(
        self,
        name: str,
        env: Env,
        migrations: Sequence[Migration],
        *,
        synchronous: Synchronous,
        audit_outbox: bool,
        sealing: RowSealing | None = None,
        postgres_migrations: Sequence[Migration] | None = None,
        postgres_sealing: PgRowSealing | None = None,
    ) -> None:
        self.name = name
        self.env = env
        self.channels = Channels(env)
        config = PostgresConfig.from_env(env) if postgres_migrations is not None else None
        self.pg: PgService | None = None
        self._database: Database | None = None
        self._sqlite_outbox: SqliteOutbox | None = None
        self._pg_outbox: PgOutbox | None = None
        # The audit service keeps its own events in its log, so it has no outbox.
        self._outbox: DurableOutbox | None
        if config is not None and postgres_migrations is not None:
            self.pg = open_pg_service(name, env, config, postgres_migrations, postgres_sealing)
            self.keyring: Keyring = self.pg.keyring
            self._pg_outbox = self.pg.outbox() if audit_outbox else None
            self._outbox = self._pg_outbox
        else:
            opened = open_service_database(name, env, migrations, synchronous, sealing)
            self._database = opened.database
            self.keyring = opened.keyring
            if audit_outbox:
                self._sqlite_outbox = SqliteOutbox(opened.database, self.keyring, name)
            self._outbox = self._sqlite_outbox
        self._shipper = OutboxShipper.from_env(self._outbox, env) if self._outbox else None

    @property
    def database(self) -> Database:
        """The SQLite database (not set on PostgreSQL: use `pg`)."""
        assert self._database is not None, f"{self.name} runs on PostgreSQL"
        return self._database

    @property
    def outbox(self) -> SqliteOutbox:
        """The SQLite outbox (on PostgreSQL: `pg_outbox`)."""
        assert self._sqlite_outbox is not None, f"{self.name} has no SQLite audit outbox"
        return self._sqlite_outbox

    @property
    def pg_outbox(self) -> PgOutbox:
        assert self._pg_outbox is not None, f"{self.name} has no PostgreSQL audit outbox"
        return self._pg_outbox

    @property
    def audit_outbox(self) -> DurableOutbox:
        """The outbox on either backend, for the domain and the servicers."""
        assert self._outbox is not None, f"{self.name} was opened without an audit outbox"
        return self._outbox

    def app(
        self,
        bindings: Sequence[ServiceBinding],
        *,
        rotatable: Sequence[Rotatable],
        background: Sequence[Job] = (),
        on_stop: Sequence[Hook] = (),
    ) -> App:
        """The App: `bindings` plus DatabaseAdminService; key rotation over `rotatable`
        (the concrete store's tables) and the outbox; the shipper; and, after `on_stop`,
        closing the shipper, the channels and the database."""
        admin: ServiceBinding
        rotation: BackgroundRotation
        if self.pg is not None:
            tables = [*rotatable, *([self.pg_outbox.rotatable()] if self._pg_outbox else [])]
            storage = self.pg.storage(None, self._pg_outbox, tables, self.env)
            rotation, admin = storage.rotation, storage.admin
        else:
            sqlite_tables = [
                *rotatable,
                *([self.outbox.rotatable()] if self._sqlite_outbox else []),
            ]
            sqlite_rotation = rotation_from_env(
                self.database, self.keyring, sqlite_tables, self._sqlite_outbox, self.env.number
            )
            rotation = sqlite_rotation
            admin = database_admin.binding(self.name, self.database, sqlite_rotation)
        jobs: list[Job] = [rotation.run, *background]
        if self._shipper is not None:
            jobs.append(self._shipper.run)
        return App(
            bindings=[*bindings, admin],
            background=jobs,
            on_stop=[*on_stop, self.close],
        )

    async def close(self) -> None:
        if self._shipper is not None:
            await self._shipper.close()  # one last delivery attempt first
        await self.channels.close()
        if self.pg is not None:
            if self._pg_outbox is not None:
                with contextlib.suppress(Exception):
                    self._pg_outbox.release()  # another replica may ship at once
            self.pg.database.close()
        else:
            self.database.close()
