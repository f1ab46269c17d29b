"""Real service processes on free loopback ports, for integration tests.

Environments come from services.launcher.topology, the same code `make run` uses.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import grpc
import psycopg

from services.launcher.health import wait_serving
from services.launcher.held_ports import HeldPorts
from services.launcher.topology import StackLayout, open_log, service_env
from tests.support.postgres import PostgresServer, database_env

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {
    "identity": "securemsg.identity.v1.IdentityService",
    "session": "securemsg.session.v1.SessionService",
    "relay": "securemsg.relay.v1.RelayService",
    "audit": "securemsg.audit.v1.AuditService",
}
FAST_KDF = {
    "KDF_ITERATIONS": "100000",
    "LOG_LEVEL": "INFO",
    "AUDIT_SHIP_IDLE_SECONDS": "0.1",
    "AUDIT_SHIP_MAX_BACKOFF_SECONDS": "0.5",
    # Revocation takes effect at once in tests; the cache's bound has its own test.
    "TOKEN_CACHE_SECONDS": "0",
    # Tests register and fetch far faster than any person; their own tests set limits.
    "REGISTRATIONS_PER_MINUTE": "1000000",
    "KEY_BUNDLES_PER_MINUTE": "1000000",
    "ONE_TIME_PREKEYS_PER_TARGET_PER_HOUR": "1000000",
    "RECIPIENT_CACHE_SECONDS": "0",
    # Argon2id at its smallest: tests check the rules, not the cost.
    "PASSWORD_HASH_MEMORY_KIB": "1024",
    "PASSWORD_HASH_TIME_COST": "1",
}


# What a service process inherits from the test run: nothing but a search path and a
# UTF-8 locale. Everything else comes from `service_env`, so a variable exported in the
# caller's shell (a limit, a key, a log level) cannot change what a test observes.
BASE_ENV = {"PATH": os.defpath, "LANG": "C.UTF-8"}


class PortReservation(HeldPorts):
    """`count` free loopback ports, held bound (never listening) until `close`.

    A service started with one of them can still bind and listen on it (see
    services.launcher.held_ports), but the kernel hands none of them to anyone else's
    bind(0) or outgoing connection. Picking a port and releasing it before the service
    binds would leave a window in which another test run could take it; holding it for
    the stack's life closes it, across restarts too.
    """

    def __init__(self, count: int) -> None:
        super().__init__([0] * count)


_HELD: list[PortReservation] = []


def free_port() -> int:
    """One loopback port, held for the rest of this process (for a server that binds with
    SO_REUSEADDR, as gRPC, Redis and http.server do)."""
    reservation = PortReservation(1)
    _HELD.append(reservation)
    return reservation.ports[0]


class ServiceProcess:
    def __init__(
        self,
        name: str,
        env: dict[str, str],
        log_path: Path,
        ca_file: Path | None,
        cwd: Path = REPO,
    ) -> None:
        self.name = name
        self.env = env
        self.log_path = log_path
        self.ca_file = ca_file
        self.cwd = cwd
        # A command the service runs under (a tracer, say), or empty.
        self.wrapper: Sequence[str] = ()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return self.env["LISTEN_ADDRESS"]

    def start(self, *, wait: bool = True) -> None:
        log = os.fdopen(open_log(self.log_path), "ab")
        self.process = subprocess.Popen(
            [*self.wrapper, sys.executable, "-m", f"services.{self.name}"],
            env={**BASE_ENV, **self.env},
            cwd=self.cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        if wait:
            self.wait_serving()

    def wait_serving(self, timeout: float = 30.0) -> None:
        process = self.process
        assert process is not None
        try:
            wait_serving(
                self.address,
                PACKAGES[self.name],
                self.ca_file,
                deadline=time.monotonic() + timeout,
                alive=lambda: process.poll() is None,
            )
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"{exc}\n--- {self.name} log ---\n{self.log()}") from None

    def run_to_exit(self, timeout: float = 30.0) -> tuple[int, str]:
        """Starts the service expecting it to refuse; returns (exit code, output)."""
        result = subprocess.run(
            [sys.executable, "-m", f"services.{self.name}"],
            env={**BASE_ENV, **self.env},
            cwd=REPO,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        return result.returncode, (result.stdout + result.stderr).decode()

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)  # the service itself, not its wrapper
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        self.process = None
        return code

    def kill(self) -> None:
        if self.process is not None:
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def pid(self) -> int:
        """The service's own process id (the wrapper's child when there is a wrapper)."""
        assert self.process is not None
        pid = self.process.pid
        if self.wrapper:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            assert len(children) == 1, f"{self.name}: wrapper has children {children}"
            pid = int(children[0])
        return pid

    def rss_bytes(self) -> int:
        """Resident memory of the running process, from /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class RawConnection(Protocol):
    def execute(self, sql: str, parameters: Sequence[object] = ..., /) -> Any: ...
    def executescript(self, sql: str, /) -> Any: ...


class _QmarkConnection:
    """A psycopg connection that takes SQLite's `?` placeholders."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, parameters: Sequence[object] = (), /) -> Any:
        return self._conn.execute(sql.replace("?", "%s"), tuple(parameters))

    def executescript(self, sql: str, /) -> Any:
        return self._conn.execute(sql)  # without parameters: several statements at once


def test_backend() -> str:
    """Where the persistent services of test stacks keep their data: `sqlite` (files, the
    default) or `postgres` (a private PostgreSQL server), from TEST_BACKEND."""
    backend = os.environ.get("TEST_BACKEND", "sqlite").strip() or "sqlite"
    if backend not in ("sqlite", "postgres"):
        raise AssertionError(f"TEST_BACKEND must be sqlite or postgres, not {backend!r}")
    return backend


class Stack:
    """A set of services sharing one temporary layout (keys, certificates, data)."""

    def __init__(
        self,
        root: Path,
        services: tuple[str, ...] = ("identity", "session"),
        extra_env: Mapping[str, Mapping[str, str]] | None = None,
        backend: str | None = None,
        postgres: PostgresServer | None = None,
    ) -> None:
        self.layout = StackLayout(root)
        self.layout.prepare()
        self.backend = backend or test_backend()
        if postgres is not None:
            self.backend = "postgres"
        databases = (
            database_env(self.layout, services, postgres) if self.backend == "postgres" else {}
        )
        # Ports for all four services, so that one not started here is simply absent
        # (calls to it fail and are retried) rather than a stray one on a default port.
        self.reservation = PortReservation(3 * len(PACKAGES))
        ports = iter(self.reservation.ports)
        self.ports = {name: (next(ports), next(ports), next(ports)) for name in PACKAGES}
        self.services = {
            name: ServiceProcess(
                name,
                service_env(
                    self.layout,
                    name,
                    self.ports,
                    extra={
                        **FAST_KDF,
                        **databases.get(name, {}),
                        **(extra_env or {}).get(name, {}),
                    },
                ),
                self.layout.logs / f"{name}.log",
                self.layout.tls / "ca.pem",
            )
            for name in services
        }

    def __getitem__(self, name: str) -> ServiceProcess:
        return self.services[name]

    def start(self) -> None:
        for service in self.services.values():
            service.start(wait=False)
        for service in self.services.values():
            service.wait_serving()

    def stop(self) -> None:
        for service in self.services.values():
            service.stop()

    def channel(
        self, name: str, cert: str | None = None, *, internal: bool = False
    ) -> grpc.Channel:
        """A TLS channel to a service's public port, or with a client certificate `cert`
        (or `internal=True`) to its internal port."""
        tls = self.layout.tls
        ca = (tls / "ca.pem").read_bytes()
        if cert is None:
            credentials = grpc.ssl_channel_credentials(root_certificates=ca)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=ca,
                private_key=(tls / f"{cert}.key").read_bytes(),
                certificate_chain=(tls / f"{cert}.pem").read_bytes(),
            )
        env = self.services[name].env
        use_internal = internal or cert is not None
        address = env["INTERNAL_LISTEN_ADDRESS"] if use_internal else env["LISTEN_ADDRESS"]
        return grpc.secure_channel(address, credentials)

    @contextlib.contextmanager
    def raw_database(self, name: str) -> Iterator[RawConnection]:
        """A direct connection to a service's stored data (SQLite file or PostgreSQL
        database), for tests that tamper with it; `?` placeholders on both, committed at
        the end of the block."""
        if self.backend == "postgres" and "DATABASE_URL_FILE" in self.services[name].env:
            url = Path(self.services[name].env["DATABASE_URL_FILE"]).read_text()
            with psycopg.connect(url) as pg:
                yield _QmarkConnection(pg)
        else:
            conn = sqlite3.connect(self.db_path(name))
            try:
                with conn:
                    yield conn
            finally:
                conn.close()

    def db_path(self, name: str) -> Path:
        return Path(self.services[name].env["DB_PATH"])


def scrape_metrics(stack: Stack, name: str) -> str:
    """A running service's Prometheus metrics, as text."""
    address = stack[name].env["METRICS_ADDRESS"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        return str(response.read().decode())
