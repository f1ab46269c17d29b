"""The one-shot migration step of a deployment on PostgreSQL (compose's `migrate`).

`python -m services.launcher.migrate_all` waits for PostgreSQL to accept connections,
provisions each persistent service's database and role (its own, reaching nothing else)
with a superuser connection, then creates or upgrades each service's schema and key
metadata with that service's own role and master key, and exits: 0 when all are ready.
The services start after it has exited successfully (`service_completed_successfully`),
so no two replicas ever race to create a schema.

Variables: POSTGRES_ADMIN_URL(_FILE), and per service <SERVICE>_DATABASE_URL(_FILE) and
<SERVICE>_DB_ENCRYPTION_KEY(_FILE) (the service's own DATABASE_URL and DB_ENCRYPTION_KEY;
also <SERVICE>_DB_ENCRYPTION_OLD_KEYS(_FILE) during a rotation). MIGRATE_WAIT_SECONDS
bounds the wait for PostgreSQL (default 120).
"""

from __future__ import annotations

import sys
import time

import psycopg
from psycopg.conninfo import conninfo_to_dict

from services.common.config import Env
from services.common.errors import StartupError
from services.common.postgres.config import PostgresConfig
from services.common.postgres.provision import provision_service
from services.common.postgres.service import open_pg_service
from services.launcher.postgres import MIGRATIONS
from services.launcher.topology import PERSISTENT


def wait_for_postgres(admin_url: str, seconds: float) -> psycopg.Connection[object]:
    """An autocommit superuser connection, once PostgreSQL accepts one."""
    give_up = time.monotonic() + seconds
    while True:
        try:
            return psycopg.connect(admin_url, autocommit=True, connect_timeout=5)
        except psycopg.OperationalError:
            if time.monotonic() > give_up:
                raise StartupError(
                    f"PostgreSQL did not accept connections within {seconds:.0f} s"
                ) from None
            time.sleep(1)


def service_env(env: Env, service: str) -> Env:
    """The service's own variables, as its replicas will read them."""
    prefix = f"{service.upper()}_"
    names = ("DATABASE_URL", "DB_ENCRYPTION_KEY", "DB_ENCRYPTION_OLD_KEYS", "KDF_ITERATIONS")
    values: dict[str, str] = {}
    for name in names:
        for suffix in ("", "_FILE"):
            value = env.optional(f"{prefix}{name}{suffix}")
            if value is not None:
                values[f"{name}{suffix}"] = value
    return Env(values)


def migrate_all(env: Env) -> None:
    admin_url = env.secret("POSTGRES_ADMIN_URL")
    assert admin_url is not None
    with wait_for_postgres(admin_url, env.number("MIGRATE_WAIT_SECONDS", 120.0)) as admin:
        for service in PERSISTENT:
            own = service_env(env, service)
            config = PostgresConfig.from_env(own)
            if config is None:
                raise StartupError(f"{service.upper()}_DATABASE_URL (or _FILE) is required")
            parts = conninfo_to_dict(config.url)
            provision_service(
                admin,
                database=str(parts["dbname"]),
                role=str(parts["user"]),
                password=str(parts["password"]),
            )
    for service in PERSISTENT:
        own = service_env(env, service)
        config = PostgresConfig.from_env(own)
        assert config is not None
        open_pg_service(service, own, config, MIGRATIONS[service]).database.close()
        print(f"{service}: database, role, schema and keys are ready", flush=True)


def main() -> int:
    try:
        migrate_all(Env())
    except StartupError as exc:
        print(f"migrate: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
