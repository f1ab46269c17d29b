"""`make run-scaled`: the whole scaled-out stack on this machine, without containers.

A private PostgreSQL (var/postgres: identity, session and audit, each its own database and
role), a private hardened Redis (var/redis, memory only: relay queues, login challenges
and limits), two replicas of every service, and nginx in front (var/proxy) on the
addresses `make run` uses, with the same certificates and CA: every client, the CLI and
the README's walkthrough work against it unchanged. `make stop` stops all of it.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from services.common import catalog
from services.launcher import postgres
from services.launcher.diagnose import port_holder
from services.launcher.health import wait_serving
from services.launcher.held_ports import HeldPorts
from services.launcher.pgcluster import ClusterError
from services.launcher.proxy import LocalProxy, ProxyError, nginx_binary
from services.launcher.redis_server import LocalRedis
from services.launcher.replicas import (
    ON_REDIS,
    Replica,
    local_replica_ports,
    plan,
    replica_overrides,
    routes,
    scaled_env,
)
from services.launcher.topology import PERSISTENT, SERVICES, StackLayout, service_env, spawn

REPLICAS = 2
REDIS_PORT = 56379
HEALTH_NAMES = {name: catalog.public_api(name).full_name for name in SERVICES}


def local_redis(layout: StackLayout) -> LocalRedis:
    return LocalRedis(layout.root / "redis", REDIS_PORT)


def local_proxy(layout: StackLayout) -> LocalProxy:
    return LocalProxy(layout.root / "proxy")


def relay_store_key(layout: StackLayout) -> Path:
    """The key every relay replica seals senders with in Redis (created once, 0600)."""
    path = layout.secrets / "relay-store.key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32))
    return path


def pid_file(layout: StackLayout, replica: Replica) -> Path:
    return layout.run / f"{replica.name}.pid"


def up(layout: StackLayout, ports: Mapping[str, tuple[int, int, int]]) -> int:
    """Starts everything; 0 once every service answers SERVING through the proxy."""
    layout.prepare()
    replicas = plan(local_replica_ports(REPLICAS))
    taken = _taken_ports(replicas, ports)
    if taken:
        print(f"error: {taken}; is `make run` running? `make stop` stops it", file=sys.stderr)
        return 1
    # No outgoing connection made while the stack starts may take one of its ports.
    every_port = [postgres.LOCAL_PORT, REDIS_PORT, *(p for s in SERVICES for p in ports[s])]
    every_port += [
        p for group in replicas.values() for r in group for p in (r.public, r.internal, r.metrics)
    ]
    with HeldPorts(every_port, skip_taken=True):
        return _start(layout, ports, replicas)


def _start(
    layout: StackLayout,
    ports: Mapping[str, tuple[int, int, int]],
    replicas: Mapping[str, list[Replica]],
) -> int:
    try:
        nginx_binary()  # before anything starts: a missing tool says how to install it
        databases = postgres.start_local(layout.root, layout.secrets, PERSISTENT)
        redis_urls = local_redis(layout).start(layout.secrets, ON_REDIS)
    except (ClusterError, OSError, ProxyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    key = relay_store_key(layout)
    started: dict[str, tuple[Replica, subprocess.Popen[bytes]]] = {}
    for service in SERVICES:
        for replica in replicas[service]:
            extra = {
                **scaled_env(
                    service,
                    database_url_file=databases.get(service, {}).get("DATABASE_URL_FILE"),
                    redis_url_file=str(redis_urls[service]) if service in ON_REDIS else None,
                    relay_store_key_file=str(key),
                    trusted_proxies="127.0.0.1",
                ),
                **replica_overrides(replica, replicas),
            }
            env = {**os.environ, **service_env(layout, service, dict(ports), extra=extra)}
            process = spawn(service, env, layout.logs / f"{replica.name}.log")
            pid_file(layout, replica).write_text(str(process.pid))
            started[replica.name] = (replica, process)
    ca = layout.tls / "ca.pem"
    for replica, process in started.values():
        try:
            wait_serving(
                f"127.0.0.1:{replica.public}",
                HEALTH_NAMES[replica.service],
                ca,
                deadline=time.monotonic() + 90,
                alive=lambda p=process: p.poll() is None,
            )
        except (RuntimeError, TimeoutError) as exc:
            print(
                f"{replica.name} failed to start: {exc}; see var/log/{replica.name}.log "
                "(`make stop` stops what did start)",
                file=sys.stderr,
            )
            return 1
    proxy = local_proxy(layout)
    try:
        proxy.write(routes(replicas, ports), layout.tls)
        proxy.start()
        for service in SERVICES:
            wait_serving(
                f"127.0.0.1:{ports[service][0]}",
                HEALTH_NAMES[service],
                ca,
                deadline=time.monotonic() + 30,
            )
    except (ProxyError, TimeoutError) as exc:
        print(f"proxy: {exc}; see var/proxy/error.log", file=sys.stderr)
        return 1
    _print_summary(replicas, ports)
    return 0


def _taken_ports(
    replicas: Mapping[str, list[Replica]], ports: Mapping[str, tuple[int, int, int]]
) -> str | None:
    """Which port the stack needs is already listened on, and by whom, if any."""
    wanted = [port for service in SERVICES for port in ports[service][:2]]
    wanted += [p for group in replicas.values() for r in group for p in (r.public, r.internal)]
    for port in wanted:
        holder = port_holder(port)
        if holder is not None:
            pid, name = holder
            return f"port {port} is in use by pid {pid} ({name})"
    return None


def _print_summary(
    replicas: Mapping[str, list[Replica]], ports: Mapping[str, tuple[int, int, int]]
) -> None:
    print()
    print(
        f"SecureMsg is running scaled out: {REPLICAS} replicas of each service behind nginx,"
        f" on PostgreSQL (127.0.0.1:{postgres.LOCAL_PORT}) and Redis (127.0.0.1:{REDIS_PORT})."
    )
    print("Connect as with `make run` (TLS with the development CA in var/tls/ca.pem):")
    for service in SERVICES:
        public, operator, _ = ports[service]
        metrics = ", ".join(f"http://127.0.0.1:{r.metrics}/metrics" for r in replicas[service])
        print(f"  {service:9} 127.0.0.1:{public}  (operator, mutual TLS: {operator})")
        print(f"            replicas: {', '.join(r.name for r in replicas[service])}; {metrics}")
    print("\nTry it: the walkthrough of README.md, unchanged (make run prints it too).")
    print("Logs: var/log/<service>-<a|b>.log, var/proxy/error.log    Stop: make stop")


def running(layout: StackLayout) -> list[Path]:
    """The pid files of replicas (any service, any label) whose process still runs."""
    alive = []
    for path in sorted(layout.run.glob("*-?.pid")) if layout.run.exists() else []:
        try:
            os.kill(int(path.read_text()), 0)
        except (OSError, ValueError):
            continue
        alive.append(path)
    return alive


def down_extras(layout: StackLayout) -> list[str]:
    """Stops the proxy and Redis if they run; what was stopped, for the message."""
    stopped = []
    if local_proxy(layout).stop():
        stopped.append("proxy")
    if local_redis(layout).stop():
        stopped.append("Redis")
    return stopped
