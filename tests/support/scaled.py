"""The scaled-out stack of `make run-scaled`, privately, for tests: every service as N
replica processes on the run's PostgreSQL and Redis, nginx in front on free ports.

Replica environments and the proxy's configuration come from services.launcher.replicas
and services.launcher.proxy, the code `make run-scaled` runs.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc

from services.client.sdk import Endpoints
from services.launcher.health import wait_serving
from services.launcher.proxy import LocalProxy
from services.launcher.replicas import (
    ON_REDIS,
    Replica,
    plan,
    replica_overrides,
    routes,
    scaled_env,
)
from services.launcher.topology import PERSISTENT, SERVICES, StackLayout, service_env
from tests.support.postgres import PostgresServer, database_env
from tests.support.redis import RedisServer
from tests.support.stack import FAST_KDF, PACKAGES, PortReservation, ServiceProcess


def _private_file(path: Path, text: str) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    return str(path)


class ScaledStack:
    """`count` replicas of each service, and the proxy; `replicas[service][i]` is a
    ServiceProcess, `endpoints` where clients and the operator connect (the proxy).

    With `services`, only those services' replicas run, and no proxy: a test then calls
    each replica directly (`replica_endpoints`)."""

    def __init__(
        self,
        root: Path,
        postgres: PostgresServer,
        redis: RedisServer,
        count: int = 2,
        extra_env: Mapping[str, Mapping[str, str]] | None = None,
        services: Sequence[str] = SERVICES,
    ) -> None:
        self.with_proxy = tuple(services) == tuple(SERVICES)
        self.layout = StackLayout(root)
        self.layout.prepare()
        databases = database_env(self.layout, PERSISTENT, postgres)
        self.database_urls = {
            name: Path(env["DATABASE_URL_FILE"]).read_text() for name, env in databases.items()
        }
        redis_files = {
            user: _private_file(self.layout.secrets / f"redis-{user}.url", redis.url(user))
            for user in ON_REDIS
        }
        store_key = _private_file(self.layout.secrets / "relay-store.key", secrets.token_hex(16))
        # Each service's replicas share a key prefix of their own on the run's Redis.
        self.prefixes = prefixes = {name: f"t{secrets.token_hex(4)}:{name}:" for name in ON_REDIS}
        self.reservation = PortReservation(3 * len(SERVICES) * (count + 1))
        ports = iter(self.reservation.ports)
        self.proxy_ports = {name: (next(ports), next(ports), next(ports)) for name in SERVICES}
        plan_ports = {
            name: [(next(ports), next(ports), next(ports)) for _ in range(count)]
            for name in SERVICES
        }
        self.plan: dict[str, list[Replica]] = plan(plan_ports)
        self.replicas: dict[str, list[ServiceProcess]] = {}
        for name in services:
            self.replicas[name] = []
            for replica in self.plan[name]:
                extra = {
                    **FAST_KDF,
                    **scaled_env(
                        name,
                        database_url_file=databases.get(name, {}).get("DATABASE_URL_FILE"),
                        redis_url_file=redis_files.get(name),
                        relay_store_key_file=store_key,
                        trusted_proxies="127.0.0.1",
                    ),
                    **({"REDIS_KEY_PREFIX": prefixes[name]} if name in ON_REDIS else {}),
                    **replica_overrides(replica, self.plan),
                    **(extra_env or {}).get(name, {}),
                }
                env = service_env(self.layout, name, self.proxy_ports, extra=extra)
                self.replicas[name].append(
                    ServiceProcess(
                        name,
                        env,
                        self.layout.logs / f"{replica.name}.log",
                        self.layout.tls / "ca.pem",
                    )
                )
        self.proxy = LocalProxy(self.layout.root / "proxy")

    def start(self) -> None:
        every = [p for processes in self.replicas.values() for p in processes]
        for process in every:
            process.start(wait=False)
        for process in every:
            process.wait_serving(timeout=90)
        if not self.with_proxy:
            return
        self.proxy.write(routes(self.plan, self.proxy_ports), self.layout.tls)
        self.proxy.start()
        for name in SERVICES:  # through the proxy, as a client sees it
            wait_serving(
                f"127.0.0.1:{self.proxy_ports[name][0]}",
                PACKAGES[name],
                self.layout.tls / "ca.pem",
                deadline=time.monotonic() + 30,
            )

    def stop(self) -> None:
        if self.with_proxy:
            self.proxy.stop()
        for processes in self.replicas.values():
            for process in processes:
                process.stop()
        self.reservation.close()

    @property
    def endpoints(self) -> Endpoints:
        """Where a client connects: the proxy's public and operator ports."""
        return Endpoints(
            ca_file=self.layout.tls / "ca.pem",
            ports={name: public for name, (public, _, _) in self.proxy_ports.items()},
            internal_ports={name: op for name, (_, op, _) in self.proxy_ports.items()},
        )

    def replica_endpoints(self, service: str, index: int) -> Endpoints:
        """Where a client reaches one replica itself, past the proxy."""
        replica = self.plan[service][index]
        return Endpoints(
            ca_file=self.layout.tls / "ca.pem",
            ports={service: replica.public},
            internal_ports={service: replica.internal},
        )

    def operator_channel(self, service: str, cert: str) -> grpc.Channel:
        """Mutual TLS with certificate `cert` to a service's operator port on the proxy."""
        return self.endpoints.channel(service, client_cert=self.layout.tls / f"{cert}.pem")

    def logs(self) -> str:
        parts = [f"--- proxy\n{self.proxy.log()[-3000:]}"] if self.with_proxy else []
        for processes in self.replicas.values():
            for process in processes:
                parts.append(f"--- {process.log_path.name}\n{process.log()[-3000:]}")
        return "\n".join(parts)
