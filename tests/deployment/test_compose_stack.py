"""docker-compose.yml and the Dockerfile, for real: built and run with podman.

`make compose-test` runs this module (so does .ci/run). It builds the image from the real
Dockerfile on a Debian base made offline (no image registry is reachable), starts the
stack from docker-compose.yml, with its monitoring profile, on free host ports and with
what `make compose-secrets` writes, runs every health check until all pass, runs the
README's "Try it" walkthrough with the CLI against the published ports, checks what the compose
file promises, restarts the stack to show the volumes keep their data, and removes
everything it made (containers, pod, network, volumes, the image), even when it fails.
The debootstrapped base, the Prometheus image and the build's layer cache are kept, so a
second run is much faster.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.launcher.topology import SERVICES, StackLayout
from services.protocol.ports import DEFAULT_PORTS, internal_port
from tests.deployment.images import base_image, build_project_image, prometheus_image
from tests.deployment.podman import REPO, Podman
from tests.deployment.project import ComposeProject, Container, published
from tests.deployment.timing import phase
from tests.deployment.tools import COMPOSE_STACK, require
from tests.deployment.walkthrough import walk_through
from tests.support.stack import PortReservation

pytestmark = [pytest.mark.compose, pytest.mark.timeout(1800)]

APP_USER = 10001  # the Dockerfile's unprivileged user


@dataclass(frozen=True)
class Expected:
    """What one compose service must look like while it runs."""

    user: int | None  # the uid every process of it runs as; None: any uid but root
    volume: str | None  # the named volume holding its data, if it keeps any
    data_dir: str = "/data"
    read_only_root: bool = False


# Every service of docker-compose.yml, in any profile: a new service (PostgreSQL, Redis,
# a proxy) is added here with what it must look like, and the tests below check it.
EXPECTED = {
    "identity": Expected(APP_USER, "identity-data"),
    "session": Expected(APP_USER, "session-data"),
    "audit": Expected(APP_USER, "audit-data"),
    "relay": Expected(APP_USER, None, read_only_root=True),
    "prometheus": Expected(None, "prometheus-data", "/prometheus", read_only_root=True),
}
PROFILES = ("monitoring",)
SCRAPED = SERVICES  # Prometheus jobs, one per service, a target per container
PORT_VARIABLES = (
    *(f"{name.upper()}_{kind}_PORT" for name in SERVICES for kind in ("PUBLIC", "INTERNAL")),
    "PROMETHEUS_PORT",
)
# File systems that live in memory or the kernel: the only writable ones the relay has.
MEMORY_FILESYSTEMS = {"tmpfs", "proc", "sysfs", "devpts", "mqueue", "cgroup", "cgroup2"}


@dataclass(frozen=True)
class Deployment:
    project: ComposeProject
    podman: Podman
    root: Path  # the CLI's working directory: var/ as `make compose-secrets` leaves it
    ports: dict[str, int]  # PORT_VARIABLES -> free host port

    def cli(self, *args: str) -> str:
        """`python -m services.cli ARGS` as the README runs it, on this run's ports."""
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

    def prometheus(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.ports['PROMETHEUS_PORT']}{path}"
        with urllib.request.urlopen(url, timeout=10) as response:
            reply = json.loads(response.read())
        assert reply["status"] == "success", reply
        return reply["data"]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tools = require(*COMPOSE_STACK)
    podman = Podman()
    root = tmp_path_factory.mktemp("compose")
    run = f"smct{os.getpid()}x{secrets.token_hex(3)}"  # project and image tag: this run's
    image = f"localhost/securemsg-backend:{run}"
    with phase("base image"):
        base = base_image(podman)
    with phase("prometheus image"):
        prometheus = prometheus_image(podman, base)
    secrets_dir = root / "var" / "compose-secrets"
    StackLayout(root / "var").export_for_compose(secrets_dir)  # = make compose-secrets
    # Held until just before `up`: podman's own bind of a published port must not meet
    # ours, and until then no other run on this machine is handed these ports.
    reservation = PortReservation(len(PORT_VARIABLES))
    ports = dict(zip(PORT_VARIABLES, reservation.ports, strict=True))
    env = {
        **{variable: str(port) for variable, port in ports.items()},
        "SECUREMSG_IMAGE": image,
        "PROMETHEUS_IMAGE": prometheus,
        "COMPOSE_SECRETS_DIR": str(secrets_dir),
    }
    project = ComposeProject(podman, tools["podman-compose"], run, env, PROFILES)
    try:
        with phase("image build"):
            build_project_image(podman, image, base, root)
        with phase("up until healthy"):
            reservation.close()
            project.up()
            project.wait_healthy()
        yield Deployment(project, podman, root, ports)
    finally:
        reservation.close()
        with phase("teardown"):
            project.remove()
            podman.run("rmi", image, check=False)
        left = project.leftovers()
        assert not left, f"teardown left {left}"
        assert not podman.image_exists(image), f"teardown left {image}"


def test_the_compose_file_and_this_test_know_the_same_services(deployment: Deployment) -> None:
    declared = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    assert set(declared) == set(EXPECTED)
    assert {c.service for c in deployment.project.containers()} == set(EXPECTED)


def test_every_container_passes_its_own_health_check(deployment: Deployment) -> None:
    for container in deployment.project.containers():
        assert deployment.podman.inspect(container.id)["Config"].get("Healthcheck")
        check = deployment.podman.run("healthcheck", "run", container.id, check=False)
        assert check.returncode == 0, f"{container.name}: {check.stdout}{check.stderr}"


@pytest.mark.parametrize("service", sorted(EXPECTED))
def test_each_container_runs_as_its_unprivileged_user(deployment: Deployment, service: str) -> None:
    containers = deployment.project.of(service)
    assert containers
    for container in containers:
        uids = _process_uids(deployment.podman, container)
        assert uids, container.name
        assert 0 not in uids, f"{container.name} has a process running as root"
        if EXPECTED[service].user is not None:
            assert uids == {EXPECTED[service].user}, container.name


def test_the_readme_walkthrough_works_against_the_published_ports(
    deployment: Deployment,
) -> None:
    """Every line of the README's "Try it", as `make run` prints it, against the
    containers; only the live wait is shortened."""
    walk_through(deployment.cli)


@pytest.mark.parametrize("service", SERVICES)
def test_public_apis_are_published_and_internal_ones_only_on_loopback(
    deployment: Deployment, service: str
) -> None:
    (container,) = deployment.project.of(service)
    ports = published(deployment.podman, container)
    public, internal = DEFAULT_PORTS[service], internal_port(service)
    assert set(ports) == {public, internal}  # metrics stay inside the compose network
    address, host_port = ports[public]
    assert address in ("", "0.0.0.0")  # noqa: S104 - all interfaces, as published
    assert host_port == deployment.ports[f"{service.upper()}_PUBLIC_PORT"]
    assert ports[internal] == ("127.0.0.1", deployment.ports[f"{service.upper()}_INTERNAL_PORT"])


@pytest.mark.parametrize("service", sorted(s for s, e in EXPECTED.items() if e.volume))
def test_each_persistent_service_keeps_its_data_in_its_own_named_volume(
    deployment: Deployment, service: str
) -> None:
    expected = EXPECTED[service]
    for container in deployment.project.of(service):
        mounts = deployment.podman.inspect(container.id)["Mounts"]
        volumes = [(m["Name"], m["Destination"]) for m in mounts if m["Type"] == "volume"]
        assert volumes == [(f"{deployment.project.name}_{expected.volume}", expected.data_dir)]


@pytest.mark.parametrize("service", sorted(s for s, e in EXPECTED.items() if e.read_only_root))
def test_read_only_services_write_to_disk_only_in_their_volume(
    deployment: Deployment, service: str
) -> None:
    expected = EXPECTED[service]
    for container in deployment.project.of(service):
        assert deployment.podman.inspect(container.id)["HostConfig"]["ReadonlyRootfs"] is True
        writable = _writable_disk_mounts(deployment.podman, container)
        assert writable == ([expected.data_dir] if expected.volume else []), container.name


def test_the_relay_has_no_volume_and_cannot_write_even_its_data_folder(
    deployment: Deployment,
) -> None:
    (relay,) = deployment.project.of("relay")
    mounts = deployment.podman.inspect(relay.id)["Mounts"]
    assert [m for m in mounts if m["Type"] == "volume"] == []
    assert [m["Destination"] for m in mounts if m["RW"]] == []  # only read-only secrets
    attempt = deployment.podman.exec(relay.id, "touch", "/data/probe")  # its user owns /data
    assert attempt.returncode != 0
    assert "Read-only file system" in attempt.stderr


def test_prometheus_scrapes_every_service_and_loads_the_alert_rules(
    deployment: Deployment,
) -> None:
    # One target per container of each service, each "up" once scraped (every 15 s).
    wanted = {job: ["up"] * len(deployment.project.of(job)) for job in SCRAPED}
    deadline = time.monotonic() + 90
    while True:
        health: dict[str, list[str]] = {job: [] for job in SCRAPED}
        for target in deployment.prometheus("/api/v1/targets")["activeTargets"]:
            health.setdefault(target["labels"]["job"], []).append(target["health"])
        if health == wanted or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert health == wanted
    groups = deployment.prometheus("/api/v1/rules")["groups"]
    loaded = {rule["name"] for group in groups for rule in group["rules"]}
    shipped = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert loaded == {rule["alert"] for group in shipped["groups"] for rule in group["rules"]}
    alerts = deployment.prometheus("/api/v1/alerts")["alerts"]
    assert [a for a in alerts if a["state"] == "firing"] == []


def test_the_volumes_keep_every_service_data_across_down_and_up(deployment: Deployment) -> None:
    # Last in this module: it restarts the whole stack.
    project = deployment.project
    deployment.cli("register", "carol")
    deployment.cli("register", "dave")
    deployment.cli("login", "carol")
    deployment.cli("login", "dave")
    deployment.cli("send", "dave", "carol", "kept only in the relay's memory")
    before = _verified_events(deployment.cli("verify"))

    with phase("down + up until healthy"):
        project.down()
        assert project.containers() == []
        volumes = {f"{project.name}_{e.volume}" for e in EXPECTED.values() if e.volume}
        assert set(project.volumes()) == volumes
        project.up()
        project.wait_healthy()

    # carol's stored token still works: identity and session kept their rows.
    assert "user id      carol" in deployment.cli("whoami", "carol")
    # The audit log kept every event, and its chain still verifies.
    assert _verified_events(deployment.cli("verify")) >= before
    # The relay forgot the queued message, as documented: it keeps nothing on disk.
    assert "no messages" in deployment.cli("inbox", "carol")


def _process_uids(podman: Podman, container: Container) -> set[int]:
    """Real, effective, saved and file-system uids of every process in the container."""
    host_pids = podman.run("top", container.id, "hpid").stdout.split()[1:]
    uids: set[int] = set()
    for pid in host_pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                uids.update(int(value) for value in line.split()[1:])
    return uids


def _writable_disk_mounts(podman: Podman, container: Container) -> list[str]:
    """Mount points inside the container that are writable and not in memory."""
    mounts = podman.exec(container.id, "cat", "/proc/self/mounts").stdout
    writable = []
    for line in mounts.splitlines():
        _, target, fstype, options, *_ = line.split()
        if "rw" in options.split(",") and fstype not in MEMORY_FILESYSTEMS:
            writable.append(target)
    return writable


def _verified_events(out: str) -> int:
    match = re.search(r"audit log intact: (\d+) events", out)
    assert match, out
    return int(match.group(1))
