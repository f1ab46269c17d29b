"""Real service processes on free loopback ports, for integration tests.

Environments come from services.launcher.topology, the same code `make run` uses.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import grpc

from services.launcher.health import wait_serving
from services.launcher.topology import StackLayout, open_log, service_env

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
    "RECIPIENT_CACHE_SECONDS": "0",
}


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports: all sockets stay open until every port is chosen."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


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
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return self.env["LISTEN_ADDRESS"]

    def start(self, *, wait: bool = True) -> None:
        log = os.fdopen(open_log(self.log_path), "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.name}"],
            env={**os.environ, **self.env},
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
            env={**os.environ, **self.env},
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
            self.process.send_signal(signal.SIGTERM)
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
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def rss_bytes(self) -> int:
        """Resident memory of the running process, from /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Stack:
    """A set of services sharing one temporary layout (keys, certificates, data)."""

    def __init__(
        self,
        root: Path,
        services: tuple[str, ...] = ("identity", "session"),
        extra_env: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.layout = StackLayout(root)
        self.layout.prepare()
        # Ports for all four services, so that one not started here is simply absent
        # (calls to it fail and are retried) rather than a stray one on a default port.
        ports = iter(free_ports(3 * len(PACKAGES)))
        self.ports = {name: (next(ports), next(ports), next(ports)) for name in PACKAGES}
        self.services = {
            name: ServiceProcess(
                name,
                service_env(
                    self.layout,
                    name,
                    self.ports,
                    extra={**FAST_KDF, **(extra_env or {}).get(name, {})},
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

    def db_path(self, name: str) -> Path:
        return Path(self.services[name].env["DB_PATH"])
