"""Host tools the deployment tests need, and the command that installs each one.

A missing tool fails the test with that command (`.ci/run` runs the same installs);
nothing here is ever skipped.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

APT = "apt-get install -y --no-install-recommends"


@dataclass(frozen=True)
class Tool:
    name: str
    package: str  # the Debian package that brings it, or "" for the project's virtualenv
    paths: tuple[str, ...] = ()  # where Debian puts helpers that are not on PATH

    def location(self) -> str | None:
        if not self.package:
            venv_script = Path(sys.executable).parent / self.name
            return str(venv_script) if venv_script.exists() else None
        found = shutil.which(self.name)
        if found:
            return found
        return next((p for p in self.paths if Path(p).exists()), None)


PODMAN = Tool("podman", "podman")
RUNC = Tool("runc", "runc", ("/usr/sbin/runc",))
CATATONIT = Tool("catatonit", "catatonit", ("/usr/libexec/podman/catatonit",))
NETAVARK = Tool("netavark", "netavark", ("/usr/lib/podman/netavark",))
AARDVARK = Tool("aardvark-dns", "aardvark-dns", ("/usr/lib/podman/aardvark-dns",))
DEBOOTSTRAP = Tool("debootstrap", "debootstrap", ("/usr/sbin/debootstrap",))
PODMAN_COMPOSE = Tool("podman-compose", "")  # pinned in requirements-dev.txt
DOCKER_COMPOSE = Tool("docker-compose", "docker-compose")
PROMTOOL = Tool("promtool", "prometheus")

# Everything the compose test drives: the engine, its runtime, init and DNS, the base
# image maker, and the compose front end.
COMPOSE_STACK = (PODMAN, RUNC, CATATONIT, NETAVARK, AARDVARK, DEBOOTSTRAP, PODMAN_COMPOSE)


def require(*tools: Tool) -> dict[str, str]:
    """Each tool's path; fails the calling test naming how to install what is missing."""
    missing = [tool for tool in tools if tool.location() is None]
    if missing:
        packages = [tool.package for tool in missing if tool.package]
        steps = []
        if packages:
            steps.append(f"{APT} {' '.join(dict.fromkeys(packages))}")
        if any(not tool.package for tool in missing):
            steps.append("make setup  (requirements-dev.txt pins it into .venv)")
        names = ", ".join(tool.name for tool in missing)
        pytest.fail(f"missing {names}; install with: {'; '.join(steps)}", pytrace=False)
    return {tool.name: str(tool.location()) for tool in tools}
