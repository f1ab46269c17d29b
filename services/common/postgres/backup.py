"""Backups of a PostgreSQL service database: pg_dump and pg_restore, custom format.

A backup is `pg_dump --format=custom` of the service's own database (a consistent
snapshot taken while replicas keep writing), checked by `pg_restore --list`, and exactly
as encrypted as the database: ciphertexts, blind indexes and the key metadata, never a key.

Restore first proves, from the dump alone, that the master key unlocks it (the key
versions are read out of the dump and checked like at service start), then restores into
an empty database in one transaction, and checks the key against the result once more.

The connection's password reaches pg_dump through its environment (PGPASSWORD), never its
command line, which other local users could read.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

from services.common.errors import IntegrityError, StartupError
from services.common.postgres.database import PgDatabase
from services.common.postgres.keys import check_key_rows, check_unlocks

INSTALL = "apt-get install -y postgresql-client"
DUMP_MAGIC = b"PGDMP"

_ENVIRONMENT = {
    "host": "PGHOST",
    "hostaddr": "PGHOSTADDR",
    "port": "PGPORT",
    "dbname": "PGDATABASE",
    "user": "PGUSER",
    "password": "PGPASSWORD",
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "connect_timeout": "PGCONNECT_TIMEOUT",
}


def libpq_environment(url: str) -> dict[str, str]:
    """The URL as PG* variables for a client tool (so no secret is on a command line)."""
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "PGAPPNAME": "securemsg-backup"}
    for key, value in conninfo_to_dict(url).items():
        if key in _ENVIRONMENT and value is not None:
            env[_ENVIRONMENT[key]] = str(value)
    return env


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise StartupError(f"{name} is not installed; install it: {INSTALL}")
    return found


class PgBackupSource:
    """`database_admin.BackupSource` for a PostgreSQL database."""

    def __init__(self, db: PgDatabase, url: str) -> None:
        self._db = db
        self._url = url

    def work_directory(self) -> Path:
        return Path(tempfile.gettempdir()) / f"securemsg-backups-{self._db.name}"

    def size_bytes(self) -> int:
        with self._db.read(snapshot=False) as conn:
            row = conn.execute("SELECT pg_database_size(current_database()) AS n").fetchone()
        return int(row["n"]) if row else 0

    def snapshot(self, target: Path) -> None:
        result = subprocess.run(
            [
                tool("pg_dump"),
                "--format=custom",
                "--no-owner",
                "--no-privileges",
                "-f",
                str(target),
            ],
            env=libpq_environment(self._url),
            capture_output=True,
            text=True,
            check=False,
            timeout=3600,
        )
        if result.returncode != 0:
            raise IntegrityError(f"pg_dump failed: {result.stderr.strip()[:500]}")

    def check(self, target: Path) -> None:
        with target.open("rb") as handle:
            if handle.read(len(DUMP_MAGIC)) != DUMP_MAGIC:
                raise IntegrityError("backup is not a pg_dump custom-format archive")
        result = subprocess.run(
            [tool("pg_restore"), "--list", str(target)],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        if result.returncode != 0 or "TABLE DATA public key_versions" not in result.stdout:
            raise IntegrityError(f"pg_restore cannot read the backup: {result.stderr[:300]}")


def check_dump_unlocks(dump: Path, master_key: str) -> None:
    """Raises StartupError unless `dump` is a SecureMsg database that `master_key` unlocks.

    Reads the key tables out of the archive (pg_restore to standard output); touches no
    database.
    """
    with dump.open("rb") as handle:
        if handle.read(len(DUMP_MAGIC)) != DUMP_MAGIC:
            raise StartupError(f"{dump.name} is not a pg_dump custom-format archive")
    tables = {}
    for table in ("key_versions", "key_retirements"):
        result = subprocess.run(
            [tool("pg_restore"), "--data-only", "--table", table, "-f", "-", str(dump)],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        if result.returncode != 0:
            raise StartupError(f"{dump.name} cannot be read: {result.stderr.strip()[:300]}")
        tables[table] = _copy_rows(result.stdout)
    rows = [(int(r[0]), _bytea(r[1]), int(r[2]), _bytea(r[3])) for r in tables["key_versions"]]
    retired = {int(r[0]) for r in tables["key_retirements"]}
    check_key_rows(rows, retired, master_key, dump.name)


def _copy_rows(script: str) -> list[list[str]]:
    """The rows of the one COPY ... FROM stdin block in a pg_restore script."""
    rows: list[list[str]] = []
    inside = False
    for line in script.splitlines():
        if line.startswith("COPY "):
            inside = True
        elif inside and line == "\\.":
            inside = False
        elif inside:
            rows.append(line.split("\t"))
    return rows


def _bytea(text: str) -> bytes:
    # COPY's text format escapes the backslash of bytea's hex output: \\x0011...
    text = text.replace("\\\\", "\\")
    if not text.startswith("\\x"):
        raise StartupError("unexpected bytea format in the backup")
    return bytes.fromhex(text[2:])


def restore_dump(dump: Path, url: str, master_key: str) -> None:
    """Restores `dump` into the (empty) database at `url`, after proving the key."""
    check_dump_unlocks(dump, master_key)
    with psycopg.connect(url, connect_timeout=10) as conn:
        existing = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ).fetchone()
    if existing and existing[0]:
        raise FileExistsError("the target database is not empty; restore into an empty one")
    result = subprocess.run(
        [
            tool("pg_restore"),
            "--single-transaction",
            "--exit-on-error",
            "--no-owner",
            "--no-privileges",
            "--dbname",
            str(conninfo_to_dict(url).get("dbname") or ""),
            str(dump),
        ],
        env=libpq_environment(url),
        capture_output=True,
        text=True,
        check=False,
        timeout=3600,
    )
    if result.returncode != 0:
        raise StartupError(f"pg_restore failed, nothing restored: {result.stderr.strip()[:500]}")
    with psycopg.connect(url, connect_timeout=10) as conn:
        check_unlocks(conn, master_key)
