"""The scaled-out stack's plan: N replicas of every service behind one proxy.

Used by `make run-scaled` (services.launcher.scaled) and by the replica test, so that
the stack that is tested is the stack that is run; docker-compose.scale.yml is checked
against the same variables (tests/deployment/test_compose_scale.py).

Every replica of a service has the same keys, database, Redis user and certificate; it
differs only in its ports. Calls between services go straight to the peer's replicas
(a static list, balanced by gRPC's round_robin); clients and the operator go through the
proxy, which listens on the addresses of `make run`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.launcher.proxy import Route
from services.launcher.topology import (
    ADDRESS_VARIABLES,
    CALLS,
    PERSISTENT,
    REDIS_USERS,
    SERVICES,
    default_ports,
)

# The services that keep state in Redis: one ACL user each.
ON_REDIS = REDIS_USERS
LABELS = "abcdefgh"


@dataclass(frozen=True)
class Replica:
    service: str
    label: str  # "a", "b", ...: names its log and pid files
    public: int
    internal: int
    metrics: int

    @property
    def name(self) -> str:
        return f"{self.service}-{self.label}"


def plan(replica_ports: Mapping[str, list[tuple[int, int, int]]]) -> dict[str, list[Replica]]:
    """Replicas of each service; `replica_ports[service]` lists (public, internal,
    metrics) per replica."""
    return {
        service: [
            Replica(service, LABELS[index], *ports)
            for index, ports in enumerate(replica_ports[service])
        ]
        for service in SERVICES
    }


def local_replica_ports(count: int) -> dict[str, list[tuple[int, int, int]]]:
    """`make run-scaled`'s replica ports: replica n of a service is `make run`'s ports
    plus 100 n (identity: 50151, 50161, 9151; then 50251, 50261, 9251; ...)."""
    ports = default_ports()
    return {
        service: [
            (ports[service][0] + step, ports[service][1] + step, ports[service][2] + step)
            for step in (100 * (index + 1) for index in range(count))
        ]
        for service in SERVICES
    }


def routes(
    replicas: Mapping[str, list[Replica]],
    proxy_ports: Mapping[str, tuple[int, int, int]],
    host: str = "127.0.0.1",
) -> list[Route]:
    """What the proxy serves: each service's public and operator port, over its replicas."""
    return [
        Route(
            service,
            proxy_ports[service][0],
            proxy_ports[service][1],
            [f"{host}:{r.public}" for r in replicas[service]],
            [f"{host}:{r.internal}" for r in replicas[service]],
        )
        for service in SERVICES
    ]


def peer_addresses(
    replicas: Mapping[str, list[Replica]], host: str = "127.0.0.1"
) -> dict[str, str]:
    """Each service's internal address variable: the static list of its replicas."""
    return {
        ADDRESS_VARIABLES[service]: ",".join(f"{host}:{r.internal}" for r in replicas[service])
        for service in SERVICES
    }


def scaled_env(
    service: str,
    *,
    database_url_file: str | None,
    redis_url_file: str | None,
    relay_store_key_file: str | None,
    trusted_proxies: str,
) -> dict[str, str]:
    """What a replica needs beyond `make run`'s variables: the shared state, and whom to
    believe about a client's address."""
    env = {"TRUSTED_PROXIES": trusted_proxies}
    if service in PERSISTENT:
        assert database_url_file is not None
        env["DATABASE_URL_FILE"] = database_url_file
    if service in ON_REDIS:
        assert redis_url_file is not None
        env["REDIS_URL_FILE"] = redis_url_file
    if service == "relay":
        assert relay_store_key_file is not None
        env["RELAY_STORE_KEY_FILE"] = relay_store_key_file
    return env


def replica_overrides(replica: Replica, replicas: Mapping[str, list[Replica]]) -> dict[str, str]:
    """A replica's own ports and its peers' replica lists (over topology.service_env)."""
    env = {
        "LISTEN_ADDRESS": f"127.0.0.1:{replica.public}",
        "INTERNAL_LISTEN_ADDRESS": f"127.0.0.1:{replica.internal}",
        "METRICS_ADDRESS": f"127.0.0.1:{replica.metrics}",
    }
    lists = peer_addresses(replicas)
    for other in CALLS[replica.service]:
        env[ADDRESS_VARIABLES[other]] = lists[ADDRESS_VARIABLES[other]]
    return env
