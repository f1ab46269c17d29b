"""The local stack: which services run, on which ports, with which environment.

`make run` and the integration tests both build process environments here, so the
stack that is tested is the stack that is run (and docker-compose.yml is checked
against the same list).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.common import catalog
from services.common.channels import address_variable
from services.common.config import DEFAULT_PORTS, internal_port, metrics_port
from services.common.peers import OPERATOR
from services.launcher.pki import ensure_pki
from services.launcher.redis_server import hardened_config
from services.protocol.ports import PERSISTENT as PERSISTENT
from services.protocol.ports import SERVICES as SERVICES

# Each service tolerates the others being briefly absent (calls wait for readiness within
# their deadline; audit events wait in outboxes), so start order does not matter.
OPERATOR_CERT = OPERATOR  # the only client-only certificate
ADDRESS_VARIABLES = {name: address_variable(name) for name in DEFAULT_PORTS}
# Whose internal API each service calls: where the catalog's allow-lists let it in.
CALLS = {name: catalog.peers_of(name) for name in SERVICES}


def default_ports() -> dict[str, tuple[int, int, int]]:
    return {n: (DEFAULT_PORTS[n], internal_port(n), metrics_port(n)) for n in SERVICES}


@dataclass(frozen=True)
class StackLayout:
    """Where one stack keeps its state."""

    root: Path  # var/ for `make run`, a temporary directory in tests

    @property
    def tls(self) -> Path:
        return self.root / "tls"

    @property
    def secrets(self) -> Path:
        return self.root / "secrets"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def logs(self) -> Path:
        return self.root / "log"

    @property
    def run(self) -> Path:
        return self.root / "run"

    def key_file(self, service: str) -> Path:
        return self.secrets / f"{service}.key"

    def old_keys_file(self, service: str) -> Path:
        """Previous master keys while a rotation is under way (see `launcher rotate`)."""
        return self.secrets / f"{service}.old-keys"

    def rotate_key(self, service: str) -> None:
        """Makes a new master key the primary one; the current one joins the old keys."""
        old = self.old_keys_file(service)
        previous = old.read_text() if old.exists() else ""
        current = self.key_file(service).read_text().strip()
        _write_secret(old, previous + current + "\n")
        _write_secret(self.key_file(service), secrets.token_urlsafe(32))

    def export_for_compose(self, target: Path) -> None:
        """Copies TLS material and master keys to where docker-compose.yml expects them.

        The copies are world-readable files in an owner-only directory: bind-mounted
        secrets keep their host mode, and the container runs as an unprivileged user.
        """
        self.prepare()
        target.mkdir(parents=True, exist_ok=True)
        os.chmod(target, 0o700)
        copies = {self.tls / "ca.pem": "ca.pem"}
        for name in SERVICES:
            copies[self.tls / f"{name}.pem"] = f"{name}.pem"
            copies[self.tls / f"{name}.key"] = f"{name}.key"
        for name in PERSISTENT:
            copies[self.key_file(name)] = f"{name}.dbkey"
        for source, name in copies.items():
            destination = target / name
            destination.write_bytes(source.read_bytes())
            os.chmod(destination, 0o644)
        for name, text in scale_out_secrets(target).items():
            _write_secret(target / name, text)
            os.chmod(target / name, 0o644)

    def prepare(self) -> None:
        """Creates TLS material and per-service master keys (0600) that do not exist yet."""
        ensure_pki(self.tls, SERVICES, (OPERATOR_CERT,))
        self.secrets.mkdir(parents=True, exist_ok=True)
        os.chmod(self.secrets, 0o700)
        for service in PERSISTENT:
            path = self.key_file(service)
            if not path.exists():
                _write_secret(path, secrets.token_urlsafe(32))
        # Databases and logs are for the services' own user only, whatever the umask.
        for directory in (self.data, self.logs, self.run):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)


def service_env(
    layout: StackLayout,
    service: str,
    ports: Mapping[str, tuple[int, int, int]],
    *,
    host: str = "127.0.0.1",
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment variables one service process is started with.

    `ports` maps each service to its (public, internal, metrics) ports.
    """
    env = {
        "LISTEN_ADDRESS": f"{host}:{ports[service][0]}",
        "INTERNAL_LISTEN_ADDRESS": f"{host}:{ports[service][1]}",
        "METRICS_ADDRESS": f"{host}:{ports[service][2]}",
        "TLS_CERT_FILE": str(layout.tls / f"{service}.pem"),
        "TLS_KEY_FILE": str(layout.tls / f"{service}.key"),
        "TLS_CA_FILE": str(layout.tls / "ca.pem"),
    }
    for other in CALLS[service]:
        env[ADDRESS_VARIABLES[other]] = f"{host}:{ports[other][1]}"
    if service not in PERSISTENT:
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # a memory-only service writes no file at all
    if service in PERSISTENT:
        env["DB_PATH"] = str(layout.data / f"{service}.db")
        env["DB_ENCRYPTION_KEY_FILE"] = str(layout.key_file(service))
        if layout.old_keys_file(service).exists():
            env["DB_ENCRYPTION_OLD_KEYS_FILE"] = str(layout.old_keys_file(service))
    env.update(extra or {})
    return env


# The compose scale-out's own secrets (docker-compose.scale.yml): PostgreSQL's superuser,
# each service's database URL (its own role), Redis' configuration and its users' URLs,
# and the relay's key for what it keeps in Redis.
COMPOSE_POSTGRES = "postgres:5432"
COMPOSE_REDIS = "redis:6379"
# What lives in Redis, each under its own ACL user: identity's limits, the relay's queues,
# and session's challenges and limits.
REDIS_USERS = ("identity", "relay", "session")


def scale_out_secrets(target: Path) -> dict[str, str]:
    """The files docker-compose.scale.yml needs beyond docker-compose.yml's, by name.

    Passwords already in `target` are kept: PostgreSQL keeps its roles in its volume, so
    a second `make compose-secrets` must not change them."""

    def password(name: str) -> str:
        kept = target / f"{name}.password"
        if kept.exists():
            return kept.read_text().strip()
        return secrets.token_urlsafe(24)

    passwords = {name: password(name) for name in ("postgres", *PERSISTENT)}
    redis_passwords = {user: password(f"redis-{user}") for user in REDIS_USERS}
    files = {f"{name}.password": value for name, value in passwords.items()}
    files.update({f"redis-{user}.password": value for user, value in redis_passwords.items()})
    files["postgres-admin.url"] = (
        f"postgresql://postgres:{passwords['postgres']}@{COMPOSE_POSTGRES}/postgres"
    )
    for name in PERSISTENT:
        files[f"{name}.database-url"] = (
            f"postgresql://{name}:{passwords[name]}@{COMPOSE_POSTGRES}/{name}"
        )
    for user in REDIS_USERS:
        files[f"{user}.redis-url"] = f"redis://{user}:{redis_passwords[user]}@{COMPOSE_REDIS}/0"
    files["redis.conf"] = hardened_config(
        port=6379,
        directory=Path("/data"),
        passwords=redis_passwords,
        bind="0.0.0.0",  # noqa: S104 - inside the compose network only
    )
    kept_key = target / "relay-store.key"
    files["relay-store.key"] = (
        kept_key.read_text().strip() if kept_key.exists() else secrets.token_urlsafe(32)
    )
    return files


def open_log(path: Path) -> int:
    """A service's log file for appending, readable by its owner only."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)


def spawn(service: str, env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Starts one process of `service` with exactly `env`, its output appended to
    `log_path`, in a session of its own: it survives the terminal; `make stop` ends it."""
    with os.fdopen(open_log(log_path), "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", f"services.{service}"],
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
