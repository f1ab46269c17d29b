"""One compose project (docker-compose.yml run by podman-compose), as the test drives it.

Every name podman gives the project's containers, networks, volumes and pod carries the
project name, and every one of them carries its label, so a run finds exactly its own
resources and removes them all, whatever happened before.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.deployment.podman import REPO, Podman

COMPOSE_FILE = REPO / "docker-compose.yml"


@dataclass(frozen=True)
class Container:
    id: str
    name: str
    service: str


class ComposeProject:
    def __init__(
        self,
        podman: Podman,
        podman_compose: str,
        name: str,
        env: Mapping[str, str],
        profiles: Sequence[str] = (),
        file: Path = COMPOSE_FILE,
    ) -> None:
        self.podman = podman
        self.name = name
        self._command = [podman_compose, "--project-name", name, "--file", str(file)]
        for profile in profiles:
            self._command += ["--profile", profile]
        self.env = {**podman.env, **env}
        self._label = f"label=io.podman.compose.project={name}"

    def compose(self, *args: str, timeout: float = 300) -> str:
        process = subprocess.Popen(
            [*self._command, *args],
            env=self.env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its podman children go with it on a timeout
        )
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            state = self.podman.run("ps", "--all", "--filter", self._label, check=False).stdout
            raise AssertionError(
                f"podman-compose {' '.join(args)} still running after {timeout:.0f} s:\n"
                f"{stdout[-3000:]}\n{stderr[-3000:]}\n{state}"
            ) from None
        if process.returncode != 0:
            raise AssertionError(
                f"podman-compose {' '.join(args)} failed ({process.returncode}):\n"
                f"{stdout[-3000:]}\n{stderr[-3000:]}"
            )
        return stdout

    def up(self, *services: str, scale: str | None = None) -> None:
        """Creates and starts the project's containers (`scale`: e.g. "relay=2")."""
        self.compose("up", "--detach", *(["--scale", scale] if scale else []), *services)

    def down(self, *, volumes: bool = False) -> None:
        self.compose("down", *(["--volumes"] if volumes else []))

    def containers(self) -> list[Container]:
        listed = self.podman.json("ps", "--all", "--filter", self._label, "--format", "json")
        return sorted(
            (
                Container(c["Id"], c["Names"][0], c["Labels"]["com.docker.compose.service"])
                for c in listed or []
            ),
            key=lambda c: c.name,
        )

    def of(self, service: str) -> list[Container]:
        return [c for c in self.containers() if c.service == service]

    def volumes(self) -> list[str]:
        listed = self.podman.json("volume", "ls", "--filter", self._label, "--format", "json")
        return sorted(v["Name"] for v in listed or [])

    def wait_healthy(self, timeout: float = 120, *, completed: Sequence[str] = ()) -> None:
        """Runs every container's health check until all pass (no systemd schedules them
        here); a container without one must be running, and one of a `completed` service
        (a one-shot step) must have exited with status 0. Fails with the logs otherwise."""
        deadline = time.monotonic() + timeout
        pending = self.containers()
        assert pending, f"project {self.name} has no containers"
        while pending and time.monotonic() < deadline:
            still = []
            for container in pending:
                state = self.podman.inspect(container.id)
                if container.service in completed:
                    if state["State"]["Status"] not in ("exited", "stopped"):
                        still.append(container)
                    elif state["State"]["ExitCode"] != 0:
                        raise AssertionError(f"{container.name} failed:\n{self.logs(container)}")
                    continue
                if state["State"]["Status"] in ("exited", "dead") or state["RestartCount"]:
                    # A service that dies while starting is restarted by its policy: that is
                    # a failure too, and its log says why.
                    raise AssertionError(f"{container.name} exited:\n{self.logs(container)}")
                if state["Config"].get("Healthcheck"):
                    check = self.podman.run("healthcheck", "run", container.id, check=False)
                    ok = check.returncode == 0
                else:
                    ok = bool(state["State"]["Running"])
                if not ok:
                    still.append(container)
            pending = still
            if pending:
                time.sleep(1)
        if pending:
            logs = "\n".join(f"--- {c.name}\n{self.logs(c)}" for c in pending)
            raise AssertionError(f"not healthy after {timeout:.0f} s:\n{logs}")

    def logs(self, container: Container) -> str:
        result = self.podman.run("logs", "--tail", "40", container.id, check=False)
        return result.stdout + result.stderr

    def leftovers(self) -> dict[str, list[str]]:
        """Whatever of this project still exists in podman, by kind."""
        listings = {
            "container": ["ps", "--all", "--filter", self._label, "--format", "{{.Names}}"],
            "volume": ["volume", "ls", "--filter", self._label, "--format", "{{.Name}}"],
            "network": ["network", "ls", "--filter", self._label, "--format", "{{.Name}}"],
            # podman-compose's pod carries no project label, only the project's name.
            "pod": ["pod", "ls", "--filter", f"name=^pod_{self.name}$", "--format", "{{.Name}}"],
        }
        found = {}
        for kind, listing in listings.items():
            names = self.podman.run(*listing, check=False).stdout.split()
            if names:
                found[kind] = names
        return found

    def remove(self) -> None:
        """Everything of the project: containers, pod, networks, volumes; never fails early."""
        # Whatever `down` leaves, for any reason, is removed below by label.
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            self.down(volumes=True)
        left = self.leftovers()
        if left.get("container"):  # with what depends on them (compose's --requires)
            self.podman.run(
                "rm", "--force", "--depend", "--time", "5", *left["container"], check=False
            )
        for name in left.get("pod", []):
            self.podman.run("pod", "rm", "--force", name, check=False)
        for name in left.get("network", []):
            self.podman.run("network", "rm", "--force", name, check=False)
        for name in left.get("volume", []):
            self.podman.run("volume", "rm", "--force", name, check=False)


def published(podman: Podman, container: Container) -> dict[int, tuple[str, int]]:
    """Container port -> (host address, host port) for each published port."""
    ports = podman.inspect(container.id)["NetworkSettings"]["Ports"] or {}
    result = {}
    for key, bindings in ports.items():
        for binding in bindings or []:
            result[int(key.split("/")[0])] = (binding["HostIp"], int(binding["HostPort"]))
    return result
