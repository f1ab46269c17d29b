"""Podman as the compose test drives it: with the repository's containers.conf."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CONTAINERS_CONF = REPO / "deploy" / "podman" / "containers.conf"


class Podman:
    """Runs podman (and tools that call podman) with CONTAINERS_CONF set."""

    def __init__(self) -> None:
        self.env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}

    def run(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["podman", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args).stdout or "null")

    def image_exists(self, name: str) -> bool:
        return self.run("image", "exists", name, check=False).returncode == 0

    def inspect(self, container: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = self.json("container", "inspect", container)
        return found[0]

    def exec(self, container: str, *command: str) -> subprocess.CompletedProcess[str]:
        return self.run("exec", container, *command, check=False, timeout=60)
