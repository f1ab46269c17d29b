"""PostgreSQL for the launcher: the local cluster of `make run-scaled`, and operator work
for PostgreSQL deployments on a host that reaches the database.

- `up --postgres` (`make run-scaled`): a local cluster in var/postgres on 127.0.0.1:55432,
  one database and role per persistent service, each service's URL in
  var/secrets/<service>.database-url (0600), passed as DATABASE_URL_FILE;
- `migrate <service>`: the one-shot schema step a deployment runs before the replicas;
- `copy-to-postgres`: moves a service's SQLite file into its freshly provisioned
  PostgreSQL database (verbatim, see services.common.postgres.copy), with a progress bar;
- restoring a pg_dump backup into an empty database (`restore --database-url-file`).

Each service's migrations come from its own PostgreSQL store module.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

import psycopg
from tqdm import tqdm

from services.audit import postgres_store as audit_store
from services.common.config import Env
from services.common.errors import StartupError
from services.common.postgres.backup import restore_dump
from services.common.postgres.config import PostgresConfig
from services.common.postgres.copy import copy_sqlite_to_postgres
from services.common.postgres.keys import PgRowSealing
from services.common.postgres.provision import provision_service
from services.common.postgres.service import open_pg_service
from services.common.schema import Migration
from services.identity import postgres_store as identity_store
from services.launcher.pgcluster import ClusterError, LocalCluster
from services.session import postgres_store as session_store

MIGRATIONS: dict[str, Sequence[Migration]] = {
    "identity": identity_store.MIGRATIONS,
    "session": session_store.MIGRATIONS,
    "audit": audit_store.MIGRATIONS,
}
# How rows from before a layout's row MACs get them, at the migration that adds them.
SEALING: dict[str, PgRowSealing | None] = {
    "identity": identity_store.SEALING,
    "session": session_store.SEALING,
    "audit": None,
}


LOCAL_PORT = 55432


def local_cluster(root: Path) -> LocalCluster:
    return LocalCluster(root / "postgres", LOCAL_PORT)


def start_local(
    root: Path, secrets_dir: Path, services: Sequence[str]
) -> dict[str, dict[str, str]]:
    """Starts (creating on first use) the local cluster; DATABASE_URL_FILE per service."""
    cluster = local_cluster(root)
    if not cluster.initialized():
        cluster.initialize()
    if not cluster.running() and not cluster.start():
        raise ClusterError(f"PostgreSQL did not start; see {cluster.log_file}")
    envs: dict[str, dict[str, str]] = {}
    with psycopg.connect(cluster.admin_url(), autocommit=True, connect_timeout=10) as admin:
        for service in services:
            path = secrets_dir / f"{service}.database-url"
            if not path.exists():
                password = secrets.token_urlsafe(24)
                provision_service(admin, database=service, role=service, password=password)
                url = f"postgresql://{service}:{password}@127.0.0.1:{LOCAL_PORT}/{service}"
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as handle:
                    handle.write(url)
            envs[service] = {"DATABASE_URL_FILE": str(path)}
    return envs


def local_running(root: Path) -> bool:
    cluster = local_cluster(root)
    return cluster.initialized() and cluster.running()


def stop_local(root: Path) -> bool:
    """Stops the local cluster if it runs; True if it did."""
    cluster = local_cluster(root)
    if cluster.initialized() and cluster.running():
        cluster.stop("fast")
        return True
    return False


def migrate(service: str) -> int:
    """The one-shot migration step of a deployment: with the service's own environment
    (DATABASE_URL, DB_ENCRYPTION_KEY, ...), create or upgrade its schema and key metadata,
    then exit; replicas started afterwards find the work done."""
    env = Env()
    try:
        config = PostgresConfig.from_env(env)
        if config is None:
            raise StartupError("DATABASE_URL (or DATABASE_URL_FILE) is not set")
        opened = open_pg_service(service, env, config, MIGRATIONS[service], SEALING[service])
        opened.database.close()
    except StartupError as exc:
        print(f"{service}: {exc}", file=sys.stderr)
        return 2
    print(f"{service}: database schema and keys are up to date")
    return 0


def _secret(path: Path) -> str:
    return path.read_text(encoding="utf-8").strip()


def copy_to_postgres(service: str, source: Path, url_file: Path, key_file: Path) -> int:
    """Copies `source` (stop the service first) into the database named by `url_file`."""
    try:
        with tqdm(desc=f"{service} rows", unit="row", total=0) as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            copied = copy_sqlite_to_postgres(
                source,
                _secret(url_file),
                service=service,
                master_key=_secret(key_file),
                migrations=MIGRATIONS[service],
                progress=progress,
            )
    except (StartupError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"copied {copied} rows of {source.name} verbatim; start {service} with DATABASE_URL "
        "(or DATABASE_URL_FILE) and the same DB_ENCRYPTION_KEY"
    )
    return 0


def restore_to_postgres(service: str, dump: Path, url_file: Path, key_file: Path) -> int:
    """Restores a pg_dump backup into the empty database named by `url_file`."""
    try:
        restore_dump(dump, _secret(url_file), _secret(key_file))
    except (StartupError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{service}: verified (the key unlocks it) and restored into the database")
    return 0
