"""What a persistent service's wiring needs to run on PostgreSQL instead of SQLite.

`open_pg_service` reads the same key variables as SQLite (DB_ENCRYPTION_KEY, its old
keys, KDF_ITERATIONS) plus DATABASE_URL, opens the pool, migrates and unlocks the keyring.
The result hands the wiring its outbox (shipped under a lease), a lease-guarded key
rotation, and the operator API for rotation status and backups.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from services.common import database_admin
from services.common.audit_events import AuditSink
from services.common.config import DatabaseConfig, Env
from services.common.crypto import Keyring
from services.common.postgres.backup import PgBackupSource
from services.common.postgres.config import PostgresConfig
from services.common.postgres.database import PgDatabase
from services.common.postgres.keys import PgRowSealing, open_pg_database, retire_versions
from services.common.postgres.lease import Lease, replica_id
from services.common.postgres.outbox import PgOutbox
from services.common.postgres.rotation import LeasedRotation
from services.common.rotation import KeyRotation, Rotatable
from services.common.schema import Migration
from services.common.storage import Storage

ROTATION_LEASE_SECONDS = 15.0
StoreT = TypeVar("StoreT")
OutboxT = TypeVar("OutboxT", bound="PgOutbox | None")


@dataclass
class PgService:
    name: str
    database: PgDatabase
    keyring: Keyring
    config: PostgresConfig
    holder: str = field(default_factory=replica_id)

    @property
    def rotation_lease(self) -> Lease:
        """Held by the one replica that re-encrypts (see LeasedRotation)."""
        return Lease(self.database, "key-rotation", self.holder, ttl=ROTATION_LEASE_SECONDS)

    def outbox(self) -> PgOutbox:
        return PgOutbox(self.database, self.keyring, self.name, self.holder)

    def rotation(
        self, parts: Sequence[Rotatable], audit: AuditSink | None, env: Env
    ) -> LeasedRotation:
        rotation = KeyRotation(
            None,
            self.keyring,
            parts,
            audit,
            batch_size=int(env.number("KEY_ROTATION_BATCH_SIZE", 500)),
            pause_seconds=env.number("KEY_ROTATION_PAUSE_SECONDS", 0.01),
            retire=lambda keep: retire_versions(self.database, keep),
        )
        return LeasedRotation(rotation, self.rotation_lease, self.database)

    def storage(
        self, store: StoreT, outbox: OutboxT, parts: Sequence[Rotatable], env: Env
    ) -> Storage[StoreT, OutboxT]:
        """The wiring's pieces: rotation under a lease, backups through pg_dump."""
        rotation = self.rotation(parts, outbox, env)
        admin = database_admin.binding(
            self.name, PgBackupSource(self.database, self.config.url), rotation
        )

        def close() -> None:
            if outbox is not None:
                with contextlib.suppress(Exception):
                    outbox.release()
            self.database.close()

        return Storage(store, outbox, rotation, admin, close, self.keyring)


def open_pg_service(
    service: str,
    env: Env,
    config: PostgresConfig,
    migrations: Sequence[Migration],
    sealing: PgRowSealing | None = None,
) -> PgService:
    keys = DatabaseConfig.from_env(service, env)
    opened = open_pg_database(
        config.url,
        service=service,
        master_key=keys.master_key,
        kdf_iterations=keys.kdf_iterations,
        migrations=migrations,
        old_keys=keys.old_keys,
        settings=config.pool,
        sealing=sealing,
    )
    return PgService(service, opened.database, opened.keyring, config)
