"""A private, throw-away PostgreSQL server for tests (or an existing one, if named).

`PostgresServer.start()` runs Debian's `initdb` and `pg_ctl` on a free loopback port in a
`mktemp -d` directory and removes everything at `stop()`. initdb refuses to run as root,
so as root the cluster belongs to the `postgres` user (`runuser -u postgres`) in a
directory chowned to it (pytest's `tmp_path` is 0700 root and unusable for that).
`fsync=off`: a test cluster never survives a machine crash, and starts in well under a
second.

Set `TEST_POSTGRES_URL` to a superuser URL of an existing server to use it instead;
each test then still gets its own databases and roles, dropped afterwards.

A missing binary fails with the command that installs it: tests never skip.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg import sql

from services.common.postgres.provision import provision_service
from tests.support.stack import free_port

INSTALL = "apt-get update && apt-get install -y postgresql"
URL_VARIABLE = "TEST_POSTGRES_URL"


def _bin_dir() -> Path:
    """The server binaries: Debian keeps them off PATH, under /usr/lib/postgresql/N/bin."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    raise AssertionError(
        f"PostgreSQL server binaries (initdb, pg_ctl) not found; install them: {INSTALL} "
        f"(or set {URL_VARIABLE} to an existing server's superuser URL)"
    )


def client_tool(name: str) -> str:
    """pg_dump, pg_restore or psql, failing with the install command when absent."""
    for candidate in (_bin_dir() / name, shutil.which(name)):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise AssertionError(f"{name} not found; install it: {INSTALL}")


class PostgresServer:
    """One server; `url(database, role)` addresses it over TCP on 127.0.0.1."""

    def __init__(self) -> None:
        self._external = os.environ.get(URL_VARIABLE, "").strip() or None
        self._dir: Path | None = None
        self.port = 0
        self._owner: str | None = None
        self._created: list[tuple[str, str]] = []

    @property
    def private(self) -> bool:
        return self._external is None

    def admin_url(self, database: str = "postgres") -> str:
        if self._external is not None:
            info = psycopg.conninfo.conninfo_to_dict(self._external)
            info["dbname"] = database
            return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    # --- private cluster ------------------------------------------------------------

    def start(self) -> None:
        if self._external is not None:
            with psycopg.connect(self.admin_url(), connect_timeout=5) as conn:
                conn.execute("SELECT 1")
            return
        bindir = _bin_dir()
        self._dir = Path(tempfile.mkdtemp(prefix="securemsg-pg-"))
        atexit.register(self.stop)
        if os.geteuid() == 0:
            self._owner = "postgres"
            entry = pwd.getpwnam("postgres")
            os.chown(self._dir, entry.pw_uid, entry.pw_gid)
        self._dir.chmod(0o700)
        self._run(
            [
                str(bindir / "initdb"),
                "-D",
                str(self._dir / "data"),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        self._start_server()

    def _start_server(self) -> None:
        assert self._dir is not None
        for _ in range(5):  # another process may take the free port before we bind it
            self.port = self.port or free_port()
            options = (
                f"-c fsync=off -c full_page_writes=off -p {self.port} -k {self._dir}"
                " -c listen_addresses=127.0.0.1 -c max_connections=300"
                " -c shared_buffers=32MB"
            )
            result = self._run(
                [
                    str(_bin_dir() / "pg_ctl"),
                    "-D",
                    str(self._dir / "data"),
                    "-l",
                    str(self._dir / "server.log"),
                    "-w",
                    "-t",
                    "30",
                    "-o",
                    options,
                    "start",
                ],
                check=False,
            )
            if result.returncode == 0:
                return
            self.port = 0
        raise AssertionError(f"PostgreSQL did not start:\n{self.log()}")

    def _run(self, argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        if self._owner is not None:
            argv = ["runuser", "-u", self._owner, "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"{argv[0]} failed: {result.stdout}{result.stderr}")
        return result

    def log(self) -> str:
        if self._dir is None:
            return ""
        path = self._dir / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def halt(self) -> None:
        """Stops the server (fast shutdown: sessions are cut off), keeping its data."""
        assert self._dir is not None, "only a private cluster can be stopped by a test"
        self._run([str(_bin_dir() / "pg_ctl"), "-D", str(self._dir / "data"), "-m", "fast", "stop"])

    def resume(self) -> None:
        """Starts a halted server again on the same port."""
        self._start_server()

    def stop(self) -> None:
        """Stops the private server and deletes everything it had."""
        if self._dir is None:
            return
        directory, self._dir = self._dir, None
        with contextlib.suppress(Exception):
            argv = [str(_bin_dir() / "pg_ctl"), "-D", str(directory / "data"), "-m", "immediate"]
            if self._owner is not None:
                argv = ["runuser", "-u", self._owner, "--", *argv]
            subprocess.run([*argv, "stop"], capture_output=True, check=False, timeout=30)
        shutil.rmtree(directory, ignore_errors=True)

    # --- databases --------------------------------------------------------------------

    def service_database(self, service: str) -> str:
        """A new database and role for `service`, as an operator provisions them.

        Returns the service's URL (its own role, which can reach only its own database).
        """
        suffix = secrets.token_hex(4)
        database, role = f"{service}_{suffix}", f"{service}_{suffix}"
        password = secrets.token_urlsafe(16)
        with psycopg.connect(self.admin_url(), autocommit=True, connect_timeout=5) as conn:
            provision_service(conn, database=database, role=role, password=password)
        self._created.append((database, role))
        return self.url(database, role, password)

    def url(self, database: str, role: str, password: str) -> str:
        if self._external is not None:
            info = psycopg.conninfo.conninfo_to_dict(self._external)
            info.update(dbname=database, user=role, password=password)
            return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]
        return f"postgresql://{role}:{password}@127.0.0.1:{self.port}/{database}"

    def drop_all(self) -> None:
        """Drops every database and role this object created (for a shared server)."""
        created, self._created = self._created, []
        if not created:
            return
        with psycopg.connect(self.admin_url(), autocommit=True, connect_timeout=5) as conn:
            for database, role in created:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(database)
                    )
                )
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@contextlib.contextmanager
def running_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        if server.private:
            server.stop()
        else:
            server.drop_all()
