"""docker-compose.scale.yml for real: PostgreSQL, the migration step, Redis, nginx and
replicated services, run with podman and `--scale relay=3`.

`make compose-test` runs this module after test_compose_stack.py. It builds the project's
image from the Dockerfile and the postgres, redis and proxy images from Debian's packages
(deploy/*/Containerfile; cached between runs like the Prometheus image), starts the file
with three relay replicas on free host ports, waits for the one-shot migration step to
exit 0 and every other container to pass its health check, runs the README walkthrough
through the proxy, shows that calls are balanced over all three relays and that Redis
refuses to write anything to disk, and removes everything it made.
"""

from __future__ import annotations

import os
import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml

from services.client.sdk import Endpoints, UserClient
from services.launcher.topology import SERVICES, StackLayout
from services.protocol.ports import DEFAULT_PORTS, internal_port
from tests.deployment.images import base_image, build_project_image, debian_image
from tests.deployment.podman import REPO, Podman
from tests.deployment.project import ComposeProject, published
from tests.deployment.timing import FIRST_ANSWERS, phase
from tests.deployment.tools import COMPOSE_STACK, require
from tests.deployment.walkthrough import walk_through
from tests.support.stack import PortReservation
from tests.support.users import new_user

pytestmark = [pytest.mark.compose, pytest.mark.timeout(1800)]

SCALE_FILE = REPO / "docker-compose.scale.yml"
RELAYS = 3
ONE_SHOT = ("migrate",)
INFRA_IMAGES = {  # compose variable -> the folder of its Containerfile
    "POSTGRES_IMAGE": "postgres",
    "REDIS_IMAGE": "redis",
    "PROXY_IMAGE": "nginx",
}
PORT_VARIABLES = tuple(
    f"{name.upper()}_{kind}_PORT" for name in SERVICES for kind in ("PUBLIC", "INTERNAL")
)


@dataclass(frozen=True)
class ScaledDeployment:
    project: ComposeProject
    podman: Podman
    root: Path
    ports: dict[str, int]

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "services.cli", *args],
            cwd=self.root,
            env={**os.environ, **{k: str(v) for k, v in self.ports.items()}},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, f"cli {shlex.join(args)}:\n{result.stderr[-3000:]}"
        return result.stdout

    def endpoints(self) -> Endpoints:
        return Endpoints(
            ca_file=self.root / "var" / "tls" / "ca.pem",
            ports={name: self.ports[f"{name.upper()}_PUBLIC_PORT"] for name in SERVICES},
        )


@pytest.fixture(scope="module")
def scaled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScaledDeployment]:
    tools = require(*COMPOSE_STACK)
    podman = Podman()
    root = tmp_path_factory.mktemp("compose-scale")
    run = f"smcs{os.getpid()}x{secrets.token_hex(3)}"
    image = f"localhost/securemsg-backend:{run}"
    with phase("base image"):
        base = base_image(podman)
    with phase("postgres, redis, nginx images"):
        infra = {
            variable: debian_image(
                podman, base, REPO / "deploy" / folder, f"localhost/securemsg-test-{folder}"
            )
            for variable, folder in INFRA_IMAGES.items()
        }
    secrets_dir = root / "var" / "compose-secrets"
    StackLayout(root / "var").export_for_compose(secrets_dir)  # = make compose-secrets
    reservation = PortReservation(len(PORT_VARIABLES))
    ports = dict(zip(PORT_VARIABLES, reservation.ports, strict=True))
    env = {
        **{variable: str(port) for variable, port in ports.items()},
        **infra,
        "SECUREMSG_IMAGE": image,
        "COMPOSE_SECRETS_DIR": str(secrets_dir),
    }
    project = ComposeProject(podman, tools["podman-compose"], run, env, file=SCALE_FILE)
    try:
        with phase("scale-out image build"):
            build_project_image(podman, image, base, root)
        with phase("scale-out up until healthy"):
            reservation.close()
            project.up(scale=f"relay={RELAYS}")
            project.wait_healthy(timeout=240, completed=ONE_SHOT)
        deployment = ScaledDeployment(project, podman, root, ports)
        with phase("scale-out warm-up"):
            _warm_up(deployment)
        yield deployment
    finally:
        reservation.close()
        with phase("scale-out teardown"):
            project.remove()
            podman.run("rmi", image, check=False)
        left = project.leftovers()
        assert not left, f"teardown left {left}"


def _warm_up(deployment: ScaledDeployment, seconds: float = 60) -> None:
    """Waits until each path between services answers once (login: session to identity;
    profile and bundle: identity to session; send and fetch through every relay replica:
    relay to session and identity), retrying what answers UNAVAILABLE, and records how
    long after every container was healthy each path first answered (printed at the end
    of the run).

    What is waited for is podman's DNS server (aardvark-dns 1.4 in Debian 12): on a busy
    host it can leave lookups of a healthy peer's name unanswered for seconds after the
    stack is up (traced once: 9 s, each lookup given up after 3 s). gRPC alone looks a
    name up again only 1.6 times later after each failure, so such a silence grew into
    the 40-60 s of UNAVAILABLE seen before; channels now look it up again every second
    (services.common.channels), and a path answers within a second of its name."""
    healthy = time.monotonic()
    give_up = healthy + seconds

    def first(path: str, call: Callable[[], object]) -> object:
        refused = 0
        while True:
            try:
                result = call()
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > give_up:
                    raise
                refused += 1
                time.sleep(0.2)
                continue
            FIRST_ANSWERS.setdefault(path, (time.monotonic() - healthy, refused))
            return result

    with UserClient(deployment.endpoints()) as client:
        keys = new_user(client, "warmup")
        token = str(first("login (session to identity)", lambda: client.login("warmup", keys)))
        first("profile (identity to session)", lambda: client.profile(token))
        first("bundle (identity to session)", lambda: client.bundle(token, "warmup"))
        for n in range(2 * RELAYS):
            first(
                f"send {n + 1} (relay to session, identity)",
                lambda: client.send(token, "warmup", b"warm"),
            )
            first(f"fetch {n + 1} (relay to session)", lambda: client.fetch(token))


def test_every_service_runs_and_the_relay_three_times(scaled: ScaledDeployment) -> None:
    declared = yaml.safe_load(SCALE_FILE.read_text())["services"]
    running = {c.service for c in scaled.project.containers()}
    assert running == set(declared)
    assert len(scaled.project.of("relay")) == RELAYS
    for name in ("identity", "session", "audit", "postgres", "redis", "proxy"):
        assert len(scaled.project.of(name)) == 1, name


def test_the_migration_step_ran_once_and_succeeded(scaled: ScaledDeployment) -> None:
    (migrate,) = scaled.project.of("migrate")
    state = scaled.podman.inspect(migrate.id)["State"]
    assert state["ExitCode"] == 0
    log = scaled.project.logs(migrate)
    for name in ("identity", "session", "audit"):
        assert f"{name}: database, role, schema and keys are ready" in log, log


def test_only_the_proxy_publishes_ports(scaled: ScaledDeployment) -> None:
    for container in scaled.project.containers():
        ports = published(scaled.podman, container)
        if container.service != "proxy":
            assert ports == {}, container.name
            continue
        assert set(ports) == {*DEFAULT_PORTS.values(), *map(internal_port, SERVICES)}
        for name in SERVICES:
            assert ports[DEFAULT_PORTS[name]][1] == scaled.ports[f"{name.upper()}_PUBLIC_PORT"]
            operator = ports[internal_port(name)]
            assert operator == ("127.0.0.1", scaled.ports[f"{name.upper()}_INTERNAL_PORT"])


def test_the_readme_walkthrough_works_through_the_proxy(scaled: ScaledDeployment) -> None:
    walk_through(scaled.cli)


def test_calls_are_balanced_over_every_relay_replica_which_share_the_queues(
    scaled: ScaledDeployment,
) -> None:
    with UserClient(scaled.endpoints()) as client:
        keys = new_user(client, "erin")
        token = client.login("erin", keys)
        sent = {client.send(token, "erin", f"note {n}".encode()) for n in range(2 * RELAYS)}
        # Sent through every replica, all read back through any one of them.
        assert {m.message_id for m in client.fetch(token)} == sent
        for _ in range(2 * RELAYS):
            client.fetch(token)
    for relay in scaled.project.of("relay"):
        metrics = scaled.podman.exec(
            relay.id,
            "python",
            "-c",
            "import urllib.request as u;"
            "print(u.urlopen('http://127.0.0.1:9053/metrics').read().decode())",
        ).stdout
        fetches = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("securemsg_rpc_total{") and "FetchMessages" in line
        )
        assert fetches > 0, f"{relay.name} served no call"


def test_redis_keeps_nothing_on_disk_and_refuses_its_services_a_snapshot(
    scaled: ScaledDeployment,
) -> None:
    (redis,) = scaled.project.of("redis")
    state = scaled.podman.inspect(redis.id)
    assert state["HostConfig"]["ReadonlyRootfs"] is True
    assert [m for m in state["Mounts"] if m["Type"] == "volume"] == []
    password = (scaled.root / "var" / "compose-secrets" / "redis-relay.password").read_text()
    for command in (["BGSAVE"], ["SAVE"], ["CONFIG", "SET", "dir", "/tmp"]):
        reply = scaled.podman.exec(
            redis.id, "redis-cli", "--no-auth-warning", "--user", "relay", "--pass",
            password.strip(), *command,
        )  # fmt: skip
        assert "NOPERM" in reply.stdout + reply.stderr, (command, reply.stdout)
    assert scaled.podman.exec(redis.id, "ls", "-A", "/data").stdout.split() == []


def test_no_container_runs_as_root(scaled: ScaledDeployment) -> None:
    for container in scaled.project.containers():
        if container.service in ONE_SHOT:
            continue
        host_pids = scaled.podman.run("top", container.id, "hpid").stdout.split()[1:]
        assert host_pids, container.name
        for pid in host_pids:
            status = Path(f"/proc/{pid}/status").read_text()
            uids = next(line for line in status.splitlines() if line.startswith("Uid:"))
            assert 0 not in {int(v) for v in uids.split()[1:]}, container.name
