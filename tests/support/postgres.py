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
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import psycopg
from psycopg import sql

from services.common.postgres.provision import provision_service
from services.launcher.pgcluster import INSTALL, ClusterError, LocalCluster, bin_dir
from services.launcher.topology import StackLayout

URL_VARIABLE = "TEST_POSTGRES_URL"
# A test cluster never survives a machine crash: skip every fsync.
FAST_OPTIONS = "-c fsync=off -c full_page_writes=off -c max_connections=300 -c shared_buffers=32MB"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bin_dir() -> Path:
    try:
        return bin_dir()
    except ClusterError as exc:
        raise AssertionError(
            f"{exc} (or set {URL_VARIABLE} to an existing server's superuser URL)"
        ) from None


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
        self._cluster: LocalCluster | None = None
        self.port = 0
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
        _bin_dir()  # fails with the install command when missing
        directory = Path(tempfile.mkdtemp(prefix="securemsg-pg-"))
        atexit.register(self.stop)
        self._cluster = LocalCluster(directory, 0, options=FAST_OPTIONS)
        try:
            self._cluster.initialize()
        except ClusterError as exc:
            raise AssertionError(str(exc)) from None
        self._start_server()

    def _start_server(self) -> None:
        assert self._cluster is not None
        for _ in range(5):  # another process may take the free port before we bind it
            self._cluster.port = self._cluster.port or _free_port()
            if self._cluster.start():
                self.port = self._cluster.port
                return
            self._cluster.port = 0
        raise AssertionError(f"PostgreSQL did not start:\n{self.log()}")

    def log(self) -> str:
        return "" if self._cluster is None else self._cluster.log()

    def halt(self) -> None:
        """Stops the server (fast shutdown: sessions are cut off), keeping its data."""
        assert self._cluster is not None, "only a private cluster can be stopped by a test"
        self._cluster.stop("fast")

    def resume(self) -> None:
        """Starts a halted server again on the same port."""
        self._start_server()

    def stop(self) -> None:
        """Stops the private server and deletes everything it had."""
        if self._cluster is None:
            return
        cluster, self._cluster = self._cluster, None
        with contextlib.suppress(Exception):
            cluster.stop("immediate")
        shutil.rmtree(cluster.directory, ignore_errors=True)

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


# Services that have a PostgreSQL store.
POSTGRES_SERVICES = ("identity", "session", "audit")


def database_env(
    layout: StackLayout, services: Iterable[str], server: PostgresServer | None = None
) -> dict[str, dict[str, str]]:
    """DATABASE_URL_FILE for each persistent service: its own database and role on
    `server` (the run's shared one by default), the URL (it holds the role's password) in
    a 0600 file."""
    server = server or shared_server()
    envs: dict[str, dict[str, str]] = {}
    for name in services:
        if name in POSTGRES_SERVICES:
            path = layout.secrets / f"{name}.database-url"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(server.service_database(name))
            envs[name] = {"DATABASE_URL_FILE": str(path)}
    return envs


_shared: PostgresServer | None = None


def shared_server() -> PostgresServer:
    """The one server of this test run, started on first use and removed at exit
    (unit fixtures and integration stacks share it; each takes its own databases)."""
    global _shared
    if _shared is None:
        server = PostgresServer()
        server.start()
        atexit.register(server.stop if server.private else server.drop_all)
        _shared = server
    return _shared


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
