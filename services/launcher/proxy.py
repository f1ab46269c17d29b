"""The front door of a scaled-out stack: nginx from Debian's packages, in front of every
replica of every service.

Public APIs (gRPC over TLS) go through nginx's `grpc_pass`: nginx ends the client's TLS
with the service's own certificate (so clients trust the same CA and names as with
`make run`), opens TLS to a replica, verified against the deployment's CA, and balances
per call (round robin over replicas, one HTTP/2 request per gRPC call). A replica that
refuses a connection is marked down for `FAIL_SECONDS` (open-source nginx checks
passively: every failed call is a probe) and the call goes to the next one; a call that
already reached a replica is never sent twice, so a send is not duplicated by the proxy.
The client's address travels in `x-forwarded-for`, which the services believe only from
a proxy listed in TRUSTED_PROXIES.

Operator APIs (mutual TLS with the operator's certificate) go through nginx's `stream`
module untouched (TCP, balanced per connection): the replica itself sees and checks the
client certificate, so the proxy holds no key that could act as the operator.

One function writes the configuration, for `make run-scaled`, the replica test and the
compose scale-out (deploy/nginx/nginx.conf, which a test keeps equal to its output).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.launcher.topology import SERVICES, default_ports

INSTALL = "apt-get install -y nginx libnginx-mod-stream"
STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")  # Debian's path
FAIL_SECONDS = 5  # how long a replica that refused a connection is left out
CONNECT_TIMEOUT_SECONDS = 2
# Subscriptions are long-lived streams: only the client's own deadline ends them.
STREAM_TIMEOUT = "1h"


@dataclass(frozen=True)
class Route:
    """One service behind the proxy: where the proxy listens for it, and its replicas."""

    service: str
    public_port: int  # the proxy's public port for this service (TLS, gRPC)
    operator_port: int  # the proxy's port for operator APIs (mutual TLS, passed through)
    replicas_public: Sequence[str]  # host:port of each replica's public API
    replicas_internal: Sequence[str]  # host:port of each replica's internal API


@dataclass(frozen=True)
class Files:
    """Where nginx finds its certificates and keeps its own files."""

    tls: str  # folder with ca.pem, <service>.pem and <service>.key
    pid: str
    error_log: str
    temp: str  # request bodies that do not fit in memory
    cert_names: Mapping[str, tuple[str, str]] | None = None  # service -> (cert, key) paths

    def cert(self, service: str) -> tuple[str, str]:
        if self.cert_names is not None:
            return self.cert_names[service]
        return f"{self.tls}/{service}.pem", f"{self.tls}/{service}.key"


def config(
    routes: Sequence[Route],
    files: Files,
    *,
    listen_host: str,
    ca_file: str,
    health_port: int | None = None,
    user: str | None = None,
    workers: int = 1,
) -> str:
    """nginx.conf text. `user`: the workers' user when nginx starts as root."""
    lines = [
        "# The front door of the scaled-out stack (services/launcher/proxy.py writes this).",
        f"load_module {STREAM_MODULE};",
        f"worker_processes {workers};",
        f"pid {files.pid};",
        # Only nginx's own failures: a failed call's log line names the client's address.
        f"error_log {files.error_log} crit;",
    ]
    if user is not None:
        lines.append(f"user {user};")
    lines += [
        "events { worker_connections 4096; }",
        "",
        "http {",
        "    access_log off;  # no client addresses or call names on disk",
        "    server_tokens off;",
        # Temporary files only if a body outgrows memory; every module's path is set, as
        # nginx creates them all at start (in a read-only container only /tmp is writable).
        f"    client_body_temp_path {files.temp}/body;",
        f"    proxy_temp_path {files.temp}/proxy;",
        f"    fastcgi_temp_path {files.temp}/fastcgi;",
        f"    uwsgi_temp_path {files.temp}/uwsgi;",
        f"    scgi_temp_path {files.temp}/scgi;",
        "    client_max_body_size 8m;",
        "    client_body_buffer_size 8m;  # request bodies stay in memory",
        "    http2_max_concurrent_streams 1024;",
        "    grpc_ssl_verify on;",
        f"    grpc_ssl_trusted_certificate {ca_file};",
        "    grpc_ssl_session_reuse on;",
        f"    grpc_connect_timeout {CONNECT_TIMEOUT_SECONDS}s;",
        f"    grpc_read_timeout {STREAM_TIMEOUT};",
        f"    grpc_send_timeout {STREAM_TIMEOUT};",
        # Only calls that never reached a replica go to the next one (nginx never resends
        # a request it has passed on: gRPC calls are POSTs, not idempotent to it).
        "    grpc_next_upstream error timeout http_502 http_503;",
        f"    grpc_next_upstream_timeout {CONNECT_TIMEOUT_SECONDS * 2}s;",
        "    ssl_protocols TLSv1.2 TLSv1.3;",
    ]
    for route in routes:
        lines.append(f"    upstream {route.service}_public {{")
        # Shared by the workers: one round robin, and one view of which replica failed.
        lines.append(f"        zone {route.service}_public 64k;")
        for address in route.replicas_public:
            lines.append(f"        server {address} max_fails=1 fail_timeout={FAIL_SECONDS}s;")
        lines.append("    }")
    for route in routes:
        cert, key = files.cert(route.service)
        lines += [
            "    server {",
            f"        listen {listen_host}:{route.public_port} ssl http2;",
            f"        ssl_certificate {cert};",
            f"        ssl_certificate_key {key};",
            "        location / {",
            f"            grpc_pass grpcs://{route.service}_public;",
            f"            grpc_ssl_name {route.service};",
            "            grpc_ssl_server_name on;",
            "            grpc_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
            "        }",
            "    }",
        ]
    if health_port is not None:
        lines += [
            "    server {  # the container's own health check: nginx is up",
            f"        listen {listen_host}:{health_port};",
            "        location = /healthz { return 200 'ok\\n'; }",
            "        location / { return 404; }",
            "    }",
        ]
    lines += ["}", "", "stream {"]
    for route in routes:
        lines.append(f"    upstream {route.service}_operator {{")
        lines.append(f"        zone {route.service}_operator 64k;")
        for address in route.replicas_internal:
            lines.append(f"        server {address} max_fails=1 fail_timeout={FAIL_SECONDS}s;")
        lines.append("    }")
    for route in routes:
        lines += [
            "    server {",
            f"        listen {listen_host}:{route.operator_port};",
            f"        proxy_pass {route.service}_operator;",
            f"        proxy_connect_timeout {CONNECT_TIMEOUT_SECONDS}s;",
            "        proxy_next_upstream on;",
            "    }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


COMPOSE_HEALTH_PORT = 8080


def compose_config() -> str:
    """deploy/nginx/nginx.conf, for docker-compose.scale.yml: the replicas are found by
    their service name (every replica's address, resolved when nginx starts), the
    certificates are compose secrets, and nginx runs unprivileged in a read-only container.

    Regenerate with `python -m services.launcher.proxy > deploy/nginx/nginx.conf`."""
    ports = default_ports()
    routes = [
        Route(
            name,
            ports[name][0],
            ports[name][1],
            [f"{name}:{ports[name][0]}"],
            [f"{name}:{ports[name][1]}"],
        )
        for name in SERVICES
    ]
    files = Files(
        tls="/run/secrets",
        pid="/tmp/nginx.pid",  # noqa: S108 - a private tmpfs in the container
        error_log="stderr",
        temp="/tmp",  # noqa: S108 - a private tmpfs in the container
        cert_names={
            name: (f"/run/secrets/{name}_tls_cert", f"/run/secrets/{name}_tls_key")
            for name in SERVICES
        },
    )
    return config(
        routes,
        files,
        listen_host="0.0.0.0",  # noqa: S104 - published by compose as it says
        ca_file="/run/secrets/ca_cert",
        health_port=COMPOSE_HEALTH_PORT,
        workers=2,
    )


class ProxyError(Exception):
    """nginx is missing, or refused its configuration (the message says why)."""


def nginx_binary() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if found is None or not STREAM_MODULE.exists():
        raise ProxyError(f"nginx with its stream module is not installed; run: {INSTALL}")
    return found


def workers_user() -> str | None:
    """As root, nginx's workers run as `nobody`; otherwise as whoever starts it."""
    if os.geteuid() != 0:
        return None
    pwd.getpwnam("nobody")
    return "nobody nogroup"


class LocalProxy:
    """nginx run from a folder of its own (config, pid, log, temp), on this host."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory.resolve()

    @property
    def conf(self) -> Path:
        return self.directory / "nginx.conf"

    @property
    def pid_file(self) -> Path:
        return self.directory / "nginx.pid"

    @property
    def log_file(self) -> Path:
        return self.directory / "error.log"

    def files(self, tls: Path) -> Files:
        return Files(
            tls=str(tls.resolve()),
            pid=str(self.pid_file),
            error_log=str(self.log_file),
            temp=str(self.directory / "temp"),
        )

    def write(self, routes: Sequence[Route], tls: Path, *, listen_host: str = "127.0.0.1") -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        user = workers_user()
        temp = self.directory / "temp"
        temp.mkdir(exist_ok=True)
        if user is not None:  # the workers write request bodies here, nothing else
            entry = pwd.getpwnam("nobody")
            os.chown(temp, entry.pw_uid, entry.pw_gid)
            self.directory.chmod(0o711)
        text = config(
            routes,
            self.files(tls),
            listen_host=listen_host,
            ca_file=str((tls / "ca.pem").resolve()),
            user=user,
        )
        self.conf.write_text(text)

    def start(self) -> None:
        """Checks the configuration, then starts nginx (it detaches; see `pid`)."""
        binary = nginx_binary()
        base = [binary, "-p", str(self.directory), "-c", str(self.conf), "-e", str(self.log_file)]
        checked = subprocess.run([*base, "-t", "-q"], capture_output=True, text=True, check=False)
        if checked.returncode != 0:
            raise ProxyError(f"nginx refused its configuration: {checked.stderr.strip()}")
        started = subprocess.run(base, capture_output=True, text=True, check=False, timeout=30)
        if started.returncode != 0:
            raise ProxyError(f"nginx did not start: {started.stderr.strip()}{self.log()}")

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def stop(self, timeout: float = 10.0) -> bool:
        """Stops nginx if it runs (fast shutdown); True if it did."""
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        give_up = time.monotonic() + timeout
        while self.pid() is not None and time.monotonic() < give_up:
            time.sleep(0.05)
        if self.pid() is not None:
            os.kill(pid, signal.SIGKILL)
        return True

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


if __name__ == "__main__":
    print(compose_config(), end="")
