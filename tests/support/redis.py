"""A private, throw-away Redis server for tests (or an existing one, if named).

`RedisServer.start()` runs Debian's `redis-server` on a free loopback port in a
`mktemp -d` directory, hardened exactly as the relay needs it in production
(services.launcher.redis_server: no persistence, the default user off, service users
without admin or dangerous commands, diskless replication, noeviction), and removes
everything at `stop()`.

Set `TEST_REDIS_URL` to an admin URL of an existing server to use it instead: the
service users are then created with `ACL SETUSER` and deleted afterwards. Tests keep
apart by key prefix (`prefix()`), not by server.

A missing binary fails with the command that installs it: tests never skip.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import redis

from services.launcher.redis_server import SERVICE_RULES, hardened_config
from services.launcher.topology import REDIS_USERS
from tests.support.stack import free_port

INSTALL = "apt-get update && apt-get install -y redis-server"
URL_VARIABLE = "TEST_REDIS_URL"
USERS = REDIS_USERS


def redis_binary() -> str:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if found is None:
        raise AssertionError(
            f"redis-server not found; install it: {INSTALL} "
            f"(or set {URL_VARIABLE} to an existing server's admin URL)"
        )
    return found


class RedisServer:
    """One server; `url(user)` addresses it as a service user, `admin()` as operator."""

    def __init__(self) -> None:
        self._external = os.environ.get(URL_VARIABLE, "").strip() or None
        self.directory: Path | None = None
        self.port = 0
        self.host = "127.0.0.1"
        self._process: subprocess.Popen[bytes] | None = None
        self._passwords = {user: secrets.token_urlsafe(16) for user in USERS}
        self._admin_password = secrets.token_urlsafe(16)
        # On a shared server the users get a suffix of their own, dropped at the end.
        self._suffix = f"_{secrets.token_hex(3)}" if self._external else ""

    @property
    def private(self) -> bool:
        return self._external is None

    def user(self, service: str) -> str:
        return f"{service}{self._suffix}"

    def url(self, service: str) -> str:
        """The URL a service uses: its own ACL user, no admin or dangerous command."""
        return f"redis://{self.user(service)}:{self._passwords[service]}@{self.host}:{self.port}/0"

    def admin_url(self) -> str:
        if self._external is not None:
            return self._external
        return f"redis://admin:{self._admin_password}@{self.host}:{self.port}/0"

    def admin(self) -> redis.Redis:
        """A synchronous client with every command (inspection: SCAN, DUMP, CONFIG GET)."""
        return redis.Redis.from_url(self.admin_url(), socket_timeout=10)

    def start(self) -> None:
        if self._external is not None:
            parts = urlsplit(self._external)
            self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 6379
            with self.admin() as client:
                for service, password in self._passwords.items():
                    client.execute_command(
                        "ACL", "SETUSER", self.user(service), "reset",
                        *SERVICE_RULES.split(), f">{password}",
                    )  # fmt: skip
            return
        binary = redis_binary()
        self.directory = Path(tempfile.mkdtemp(prefix="securemsg-redis-"))
        atexit.register(self.stop)
        for _ in range(5):  # another process may take the free port before we bind it
            self.port = free_port()
            config = self.directory / "redis.conf"
            config.write_text(
                hardened_config(
                    port=self.port,
                    directory=self.directory / "data",
                    passwords=self._passwords,
                    admin_password=self._admin_password,
                )
            )
            (self.directory / "data").mkdir(exist_ok=True)
            config.chmod(0o600)
            log = (self.directory / "redis.log").open("ab")
            self._process = subprocess.Popen(
                [binary, str(config)], stdout=log, stderr=subprocess.STDOUT
            )
            log.close()
            if self._wait_ready():
                return
            self._halt()
        raise AssertionError(f"redis-server did not start:\n{self.log()}")

    def _wait_ready(self, timeout: float = 15.0) -> bool:
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            if self._process is not None and self._process.poll() is not None:
                return False
            with contextlib.suppress(redis.ConnectionError), self.admin() as client:
                client.ping()
                return True
            time.sleep(0.05)
        return False

    def log(self) -> str:
        if self.directory is None:
            return ""
        path = self.directory / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def files(self) -> list[Path]:
        """Every file under the server's working directory (where a dump would go)."""
        assert self.directory is not None, "only a private server's directory is known"
        return sorted(p for p in (self.directory / "data").rglob("*") if p.is_file())

    def _halt(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._process = None

    def stop(self) -> None:
        if self._external is not None:
            with contextlib.suppress(Exception), self.admin() as client:
                for service in USERS:
                    client.execute_command("ACL", "DELUSER", self.user(service))
            return
        self._halt()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


def prefix() -> str:
    """A key prefix of one test's own, so tests sharing a server never meet."""
    return f"t{secrets.token_hex(4)}:"


@contextlib.contextmanager
def running_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def relay_env(server: RedisServer, key_prefix: str | None = None) -> dict[str, str]:
    """What a relay process needs to keep its queues in `server` (under a prefix of its
    own unless `key_prefix` names one that replicas share)."""
    return {
        "REDIS_URL": server.url("relay"),
        "RELAY_STORE_KEY": "relay store key for integration tests",
        "REDIS_KEY_PREFIX": key_prefix or prefix(),
    }
