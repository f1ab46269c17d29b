"""Local launcher behind `make run` / `make stop`: `python -m services.launcher up|down|status`.

Creates development secrets and TLS material under var/ on first run, starts every
service as its own background process (logs in var/log/), waits for each to report
SERVING, and prints where they listen and how to try them (`up --postgres`: on a local
PostgreSQL; `up --scaled`, `make run-scaled`: replicas behind a proxy, see scaled.py).
Also the operator's work on the server host: `rotate <service>`, `restore` of a backup
(a SQLite file, or a pg_dump into PostgreSQL), and `copy-to-postgres`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from services.common import catalog
from services.common.errors import StartupError
from services.launcher import postgres, scaled
from services.launcher.diagnose import explain
from services.launcher.health import check, wait_serving
from services.launcher.held_ports import HeldPorts
from services.launcher.pgcluster import ClusterError
from services.launcher.restore import restore_backup
from services.launcher.topology import (
    PERSISTENT,
    SERVICES,
    StackLayout,
    default_ports,
    service_env,
    spawn,
)
from services.launcher.walkthrough import try_it_lines

LAYOUT = StackLayout(Path("var"))
HEALTH_NAMES = {name: catalog.public_api(name).full_name for name in SERVICES}
PORTS = default_ports()


def _pid_file(service: str, layout: StackLayout = LAYOUT) -> Path:
    return layout.run / f"{service}.pid"


def _running_pid(service: str, layout: StackLayout = LAYOUT) -> int | None:
    try:
        pid = int(_pid_file(service, layout).read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def up(
    layout: StackLayout = LAYOUT,
    ports: Mapping[str, tuple[int, int, int]] = PORTS,
    *,
    on_postgres: bool = False,
) -> int:
    """Starts what is not running yet and waits for all; 0 once every service serves.

    `on_postgres`: identity, session and audit on a local PostgreSQL, one process each."""
    if scaled.running(layout) or scaled.local_proxy(layout).pid() is not None:
        # Its proxy would answer the health checks on these very ports.
        print(
            "make run-scaled is running on these addresses; `make stop` stops it", file=sys.stderr
        )
        return 1
    layout.prepare()
    # No outgoing connection made while the stack starts may take one of its ports.
    held = [p for service in SERVICES for p in ports[service]]
    with HeldPorts([*held, postgres.LOCAL_PORT] if on_postgres else held, skip_taken=True):
        return _start(layout, ports, on_postgres=on_postgres)


def _start(
    layout: StackLayout, ports: Mapping[str, tuple[int, int, int]], *, on_postgres: bool
) -> int:
    databases: dict[str, dict[str, str]] = {}
    if on_postgres:
        try:
            databases = postgres.start_local(layout.root, layout.secrets, PERSISTENT)
        except (ClusterError, OSError) as exc:
            print(f"PostgreSQL: {exc}", file=sys.stderr)
            return 1
        print(f"PostgreSQL        127.0.0.1:{postgres.LOCAL_PORT} (data in var/postgres)")
    started: dict[str, subprocess.Popen[bytes]] = {}
    log_starts: dict[str, int] = {}  # where this start's output begins in each log
    for service in SERVICES:
        if _running_pid(service, layout):
            print(f"{service:9} already running")
            continue
        extra = databases.get(service)
        env = {**os.environ, **service_env(layout, service, dict(ports), extra=extra)}
        log_path = layout.logs / f"{service}.log"
        log_starts[service] = log_path.stat().st_size if log_path.exists() else 0
        process = spawn(service, env, log_path)
        _pid_file(service, layout).write_text(str(process.pid))
        started[service] = process
    ca = layout.tls / "ca.pem"
    for service in SERVICES:
        child = started.get(service)
        try:
            wait_serving(
                f"127.0.0.1:{ports[service][0]}",
                HEALTH_NAMES[service],
                ca,
                deadline=time.monotonic() + 60,
                alive=(lambda p=child: p is None or p.poll() is None),
            )
        except TimeoutError as exc:
            print(f"{service} failed to start: {exc}; see var/log/{service}.log", file=sys.stderr)
            return 1
        except RuntimeError:
            with (layout.logs / f"{service}.log").open("rb") as log:
                log.seek(log_starts.get(service, 0))
                output = log.read().decode("utf-8", "replace")
            print(
                f"{service} failed to start: {explain(output, ports[service])}\n"
                f"  (log: var/log/{service}.log; `make stop` stops the services that did start)",
                file=sys.stderr,
            )
            return 1
    print()
    print("SecureMsg is running (TLS with the development CA in var/tls/ca.pem):")
    for service in SERVICES:
        public, internal, metrics = ports[service]
        print(
            f"  {service:9} 127.0.0.1:{public}  (internal, mutual TLS: {internal};"
            f" metrics: http://127.0.0.1:{metrics}/metrics)"
        )
    print("\nTry it (from README.md):")
    for line in try_it_lines():
        print(f"  {line}")
    print("Logs: var/log/<service>.log    Stop: make stop")
    return 0


def down(layout: StackLayout = LAYOUT) -> int:
    """Stops every service process the launcher started (`make run`'s, or each replica of
    `make run-scaled`), then the proxy, Redis and PostgreSQL if they run."""
    replicas = sorted(layout.run.glob("*-?.pid")) if layout.run.exists() else []
    names = [*SERVICES, *(p.stem for p in replicas)]
    for service in names:
        pid = _running_pid(service, layout)
        if pid is None:
            _pid_file(service, layout).unlink(missing_ok=True)
            continue
        os.kill(pid, signal.SIGTERM)
        for _ in range(150):
            if _running_pid(service, layout) is None:
                break
            time.sleep(0.1)
            with contextlib.suppress(ChildProcessError):  # reap it if it is our child
                os.waitpid(pid, os.WNOHANG)
        print(f"{service:9} stopped")
        _pid_file(service, layout).unlink(missing_ok=True)
    for what in scaled.down_extras(layout):
        print(f"{what} stopped")
    if postgres.stop_local(layout.root):
        print("PostgreSQL stopped")
    return 0


def status() -> int:
    ca = LAYOUT.tls / "ca.pem"
    healthy = True
    for service in SERVICES:
        state = check(f"127.0.0.1:{PORTS[service][0]}", HEALTH_NAMES[service], ca)
        healthy &= state == "SERVING"
        print(f"{service:9} {state}")
    return 0 if healthy else 1


def rotate(service: str) -> int:
    """Rotates one service's master key: new key, old one kept, service restarted."""
    if service not in ("identity", "session", "audit"):
        print("rotate needs one of: identity, session, audit", file=sys.stderr)
        return 2
    LAYOUT.rotate_key(service)
    pid = _running_pid(service)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        while _running_pid(service) is not None:
            time.sleep(0.1)
        _pid_file(service).unlink(missing_ok=True)
    print(f"{service}: new master key in var/secrets/{service}.key; the previous one is kept")
    print(f"in var/secrets/{service}.old-keys until re-encryption finishes.")
    status = up(on_postgres=postgres.local_running(LAYOUT.root))
    if status == 0:
        print(f"Follow progress: .venv/bin/python -m services.cli rotation --service {service}")
    return status


def compose_secrets() -> int:
    target = LAYOUT.root / "compose-secrets"
    LAYOUT.export_for_compose(target)
    print(f"development secrets for docker-compose.yml written to {target}/")
    return 0


def restore(service: str, backup: Path, data_dir: Path, key_file: Path) -> int:
    """Verifies a backup with the service's master key and places it in `data_dir`."""
    try:
        target = restore_backup(backup, data_dir, service, key_file.read_text().strip())
    except (StartupError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"verified (integrity ok, key unlocks it) and restored to {target}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m services.launcher")
    commands = parser.add_subparsers(dest="command")
    up_cmd = commands.add_parser("up", help="start every service (the default)")
    up_cmd.add_argument(
        "--postgres",
        action="store_true",
        help="identity, session and audit on a local PostgreSQL, one process each",
    )
    up_cmd.add_argument(
        "--scaled",
        action="store_true",
        help="make run-scaled: PostgreSQL, Redis, two replicas of each service, nginx in front",
    )
    for name, text in (
        ("down", "stop the services"),
        ("status", "health of each service"),
        ("compose-secrets", "dev keys and certificates for docker-compose.yml"),
    ):
        commands.add_parser(name, help=text)
    rotate_cmd = commands.add_parser("rotate", help="new master key for one service, restart it")
    rotate_cmd.add_argument("service", choices=PERSISTENT)
    restore_cmd = commands.add_parser(
        "restore", help="operator: verify a backup and place it in an empty data directory"
    )
    restore_cmd.add_argument("--service", choices=PERSISTENT, required=True)
    restore_cmd.add_argument("--backup", type=Path, required=True)
    target = restore_cmd.add_mutually_exclusive_group(required=True)
    target.add_argument("--data-dir", type=Path, help="SQLite: an empty data directory")
    target.add_argument(
        "--database-url-file",
        type=Path,
        help="PostgreSQL: file holding the URL of the service's empty database",
    )
    restore_cmd.add_argument(
        "--key-file", type=Path, required=True, help="file holding that service's master key"
    )
    migrate_cmd = commands.add_parser(
        "migrate",
        help="deployment: create or upgrade a service's PostgreSQL schema and keys, then exit",
    )
    migrate_cmd.add_argument("service", choices=PERSISTENT)
    copy_cmd = commands.add_parser(
        "copy-to-postgres",
        help="operator: copy a stopped service's SQLite file into its empty PostgreSQL database",
    )
    copy_cmd.add_argument("--service", choices=PERSISTENT, required=True)
    copy_cmd.add_argument("--source", type=Path, required=True, help="the service's .db file")
    copy_cmd.add_argument(
        "--database-url-file", type=Path, required=True, help="file holding DATABASE_URL"
    )
    copy_cmd.add_argument(
        "--key-file", type=Path, required=True, help="file holding that service's master key"
    )
    args = parser.parse_args()
    if args.command == "rotate":
        return rotate(args.service)
    if args.command == "restore" and args.database_url_file is not None:
        return postgres.restore_to_postgres(
            args.service, args.backup, args.database_url_file, args.key_file
        )
    if args.command == "restore":
        return restore(args.service, args.backup, args.data_dir, args.key_file)
    if args.command == "migrate":
        return postgres.migrate(args.service)
    if args.command == "copy-to-postgres":
        return postgres.copy_to_postgres(
            args.service, args.source, args.database_url_file, args.key_file
        )
    if args.command == "up" and args.scaled:
        return scaled.up(LAYOUT, PORTS)
    if args.command in (None, "up"):
        return up(on_postgres=getattr(args, "postgres", False))
    simple = {"down": down, "status": status, "compose-secrets": compose_secrets}
    return simple[args.command]()


if __name__ == "__main__":
    raise SystemExit(main())
