"""Wiring shared by the services' app.py: binding servicers by catalog entry, and what
every persistent service opens (database, keyring, audit outbox and its shipper, key
rotation, channels to its peers) and closes again."""

from __future__ import annotations

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
from services.common.rotation import Rotatable, rotation_from_env
from services.common.schema import Migration
from services.common.server import App, ServiceBinding
from services.common.sqlite import Database, RowSealing, Synchronous, open_service_database

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
    `database`/`keyring`/`outbox`, and hand everything over with `app`."""

    def __init__(
        self,
        name: str,
        env: Env,
        migrations: Sequence[Migration],
        *,
        synchronous: Synchronous,
        audit_outbox: bool,
        sealing: RowSealing | None = None,
    ) -> None:
        self.name = name
        self.env = env
        opened = open_service_database(name, env, migrations, synchronous, sealing)
        self.database: Database = opened.database
        self.keyring: Keyring = opened.keyring
        self.channels = Channels(env)
        # The audit service keeps its own events in its log, so it has no outbox.
        self._outbox = SqliteOutbox(self.database, self.keyring, name) if audit_outbox else None
        self._shipper = OutboxShipper.from_env(self._outbox, env) if self._outbox else None

    @property
    def outbox(self) -> SqliteOutbox:
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
        tables = [*rotatable, *([self._outbox.rotatable()] if self._outbox else [])]
        rotation = rotation_from_env(
            self.database, self.keyring, tables, self._outbox, self.env.number
        )
        jobs: list[Job] = [rotation.run, *background]
        if self._shipper is not None:
            jobs.append(self._shipper.run)
        return App(
            bindings=[*bindings, database_admin.binding(self.name, self.database, rotation)],
            background=jobs,
            on_stop=[*on_stop, self.close],
        )

    async def close(self) -> None:
        if self._shipper is not None:
            await self._shipper.close()  # one last delivery attempt first
        await self.channels.close()
        self.database.close()
