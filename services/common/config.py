"""Configuration from environment variables, with `NAME_FILE` variants for secrets.

A secret can be given inline (`DB_ENCRYPTION_KEY=...`) or, as Docker secrets do, as a
path (`DB_ENCRYPTION_KEY_FILE=/run/secrets/identity_key`). Giving both is an error
rather than a silent preference.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import StartupError
from services.protocol.ports import DEFAULT_PORTS as DEFAULT_PORTS
from services.protocol.ports import internal_port as internal_port

MIN_KDF_ITERATIONS = 100_000
DEFAULT_KDF_ITERATIONS = 600_000  # OWASP 2023 advice for PBKDF2-HMAC-SHA256
MIN_MASTER_KEY_CHARS = 16


def metrics_port(service: str) -> int:
    """Prometheus /metrics: 9051 for identity ... 9054 for audit."""
    return DEFAULT_PORTS[service] - 41_000


class Env:
    """Typed reads from an environment mapping (os.environ by default)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ

    def string(self, name: str, default: str | None = None) -> str:
        value = self._environ.get(name, "").strip()
        if value:
            return value
        if default is None:
            raise StartupError(f"environment variable {name} is required")
        return default

    def optional(self, name: str) -> str | None:
        value = self._environ.get(name, "").strip()
        return value or None

    def integer(self, name: str, default: int, *, minimum: int | None = None) -> int:
        raw = self._environ.get(name, "").strip()
        if not raw:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise StartupError(f"{name} must be an integer, got {raw!r}") from None
        if minimum is not None and value < minimum:
            raise StartupError(f"{name} must be at least {minimum}, got {value}")
        return value

    def number(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        raw = self._environ.get(name, "").strip()
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise StartupError(f"{name} must be a number, got {raw!r}") from None
        if value < minimum:
            raise StartupError(f"{name} must be at least {minimum}, got {value}")
        return value

    def flag(self, name: str, default: bool = False) -> bool:
        raw = self._environ.get(name, "").strip().lower()
        if not raw:
            return default
        if raw in {"1", "true", "yes", "on"}:
            return True
        if raw in {"0", "false", "no", "off"}:
            return False
        raise StartupError(f"{name} must be true or false, got {raw!r}")

    def secret(self, name: str, *, required: bool = True) -> str | None:
        """Reads NAME or the file named by NAME_FILE. The value is never echoed."""
        inline = self._environ.get(name, "").strip()
        path = self._environ.get(f"{name}_FILE", "").strip()
        if inline and path:
            raise StartupError(f"set either {name} or {name}_FILE, not both")
        if path:
            try:
                value = Path(path).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise StartupError(f"cannot read {name}_FILE: {exc.strerror}") from None
            if not value:
                raise StartupError(f"{name}_FILE points to an empty file")
            return value
        if inline:
            return inline
        if required:
            raise StartupError(f"{name} (or {name}_FILE) is required")
        return None


@dataclass(frozen=True)
class TlsConfig:
    """Server certificate and key, and the CA that signs every peer's certificate."""

    cert_file: Path
    key_file: Path
    ca_file: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        try:
            return (
                self.cert_file.read_bytes(),
                self.key_file.read_bytes(),
                self.ca_file.read_bytes(),
            )
        except OSError as exc:
            raise StartupError(f"cannot read TLS material {exc.filename}: {exc.strerror}") from None


@dataclass(frozen=True)
class ServerConfig:
    """What every service needs to listen: address, transport security, limits."""

    service: str
    listen_address: str
    internal_listen_address: str
    tls: TlsConfig | None  # None only when INSECURE_PLAINTEXT is set explicitly
    max_message_bytes: int
    shutdown_grace_seconds: float
    # Connections older than this are ended (gracefully), so clients spread over new
    # replicas; see services.common.channels.
    max_connection_age: float = 300.0
    # Threads for blocking work (storage). Writers waiting for a group commit hold one
    # each, so more threads let more writes share an fsync.
    worker_threads: int = 32

    @classmethod
    def from_env(cls, service: str, env: Env) -> ServerConfig:
        port = DEFAULT_PORTS[service]
        config = cls(
            service=service,
            listen_address=env.string("LISTEN_ADDRESS", f"127.0.0.1:{port}"),
            internal_listen_address=env.string(
                "INTERNAL_LISTEN_ADDRESS", f"127.0.0.1:{internal_port(service)}"
            ),
            tls=tls_from_env(env),
            max_message_bytes=env.integer("MAX_MESSAGE_BYTES", 1024 * 1024, minimum=4096),
            shutdown_grace_seconds=env.number("SHUTDOWN_GRACE_SECONDS", 5.0),
            max_connection_age=env.number("MAX_CONNECTION_AGE_SECONDS", 300.0, minimum=1.0),
            worker_threads=env.integer("WORKER_THREADS", 32, minimum=1),
        )
        if config.tls is None:
            # Without TLS nothing authenticates a caller but its being on this machine.
            for name in ("LISTEN_ADDRESS", "INTERNAL_LISTEN_ADDRESS"):
                address = getattr(config, name.lower())
                if not is_loopback_address(address):
                    raise StartupError(
                        f"{name}={address} is not a loopback address: with "
                        "INSECURE_PLAINTEXT=true a service listens only on 127.0.0.1, ::1 or "
                        "localhost. Use TLS to serve other machines"
                    )
        return config


def is_loopback_address(address: str) -> bool:
    """Whether a listen address ("127.0.0.1:50051", "[::1]:0", "localhost:1") is loopback."""
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tls_from_env(env: Env) -> TlsConfig | None:
    """TLS is the default; plaintext only with an explicit INSECURE_PLAINTEXT=true."""
    if env.flag("INSECURE_PLAINTEXT"):
        return None
    missing = [n for n in ("TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CA_FILE") if not env.optional(n)]
    if missing:
        raise StartupError(
            f"{', '.join(missing)} not set: give TLS material (`make run` creates a development "
            "CA under var/tls), or set INSECURE_PLAINTEXT=true for local development only"
        )
    return TlsConfig(
        cert_file=Path(env.string("TLS_CERT_FILE")),
        key_file=Path(env.string("TLS_KEY_FILE")),
        ca_file=Path(env.string("TLS_CA_FILE")),
    )


@dataclass(frozen=True)
class DatabaseConfig:
    """Where a persistent service keeps its file, and the master secret that protects it."""

    path: Path
    master_key: str
    kdf_iterations: int
    old_keys: tuple[str, ...] = ()
    max_bytes: int = 0  # 0: as large as the disk allows

    @classmethod
    def from_env(cls, service: str, env: Env) -> DatabaseConfig:
        master = env.secret("DB_ENCRYPTION_KEY")
        assert master is not None
        if len(master) < MIN_MASTER_KEY_CHARS:
            raise StartupError(
                f"DB_ENCRYPTION_KEY must be at least {MIN_MASTER_KEY_CHARS} characters; "
                "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        old = env.secret("DB_ENCRYPTION_OLD_KEYS", required=False) or ""
        return cls(
            path=Path(env.string("DB_PATH", f"var/data/{service}.db")),
            master_key=master,
            # Previous master keys during a rotation, separated by commas or newlines.
            old_keys=tuple(k.strip() for k in old.replace(",", "\n").splitlines() if k.strip()),
            kdf_iterations=env.integer(
                "KDF_ITERATIONS", DEFAULT_KDF_ITERATIONS, minimum=MIN_KDF_ITERATIONS
            ),
            max_bytes=env.integer("DB_MAX_BYTES", 0, minimum=0),
        )
