"""The client SDK and CLI stand apart from the servers.

A team that takes the SDK must not get the session store, the SQLite layer or the
Prometheus metrics with it; import-linter checks the static imports (`make lint`),
this checks what an import really loads, in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLIENT_SIDE = {"client", "cli", "protocol"}  # packages under services/

_PROBE = """
import json, pkgutil, sys
import services.client, services.cli
for package in (services.client, services.cli):
    for module in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        __import__(module.name)
print(json.dumps(sorted(sys.modules)))
"""


def _loaded_by_importing_the_client() -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return list(json.loads(result.stdout))


def test_importing_the_sdk_and_cli_loads_no_server_module() -> None:
    loaded = _loaded_by_importing_the_client()
    ours = sorted(name for name in loaded if name.split(".")[0] == "services")
    assert "services.client.sdk" in ours
    assert "services.cli.__main__" in ours
    server_side = [name for name in ours[1:] if name.split(".")[1] not in CLIENT_SIDE]
    assert server_side == []
