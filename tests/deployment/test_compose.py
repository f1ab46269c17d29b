"""docker-compose.yml and the Dockerfile: valid, and the same topology as `make run`.

Debian's docker-compose validates and resolves the file (a missing one fails with the
install command). test_compose_stack.py runs it for real (`make compose-test`).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.config import DEFAULT_PORTS, internal_port
from services.launcher.topology import (
    CALLS,
    PERSISTENT,
    SERVICES,
    StackLayout,
    default_ports,
    service_env,
)
from tests.deployment.tools import DOCKER_COMPOSE, require

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    tool = require(DOCKER_COMPOSE)["docker-compose"]
    result = subprocess.run(
        [tool, "--file", str(REPO / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    resolved: dict[str, Any] = yaml.safe_load(result.stdout)
    return resolved


def test_the_file_defines_exactly_the_launchers_services(compose: dict[str, Any]) -> None:
    always_on = {name for name, s in compose["services"].items() if not s.get("profiles")}
    assert always_on == set(SERVICES)


def test_monitoring_is_an_optional_profile_scraping_every_service(
    compose: dict[str, Any],
) -> None:
    prometheus = compose["services"]["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    scraped = {
        job["job_name"]: sd["port"] for job in config["scrape_configs"]
        for sd in job["dns_sd_configs"] if sd["names"] == [job["job_name"]]
    }  # fmt: skip
    assert scraped == {name: default_ports()[name][2] for name in SERVICES}
    assert all(_port(p)[0] == "127.0.0.1" for p in prometheus["ports"])


def test_every_published_host_port_can_be_moved() -> None:
    """So that a test (or a second stack) never collides with one on the default ports."""
    text = (REPO / "docker-compose.yml").read_text()
    for line in re.findall(r'^\s+- "(.*:\d+)"$', text, re.MULTILINE):
        assert re.fullmatch(r"(127\.0\.0\.1:)?\$\{[A-Z_]+_PORT:-\d+\}:\d+", line), line


@pytest.mark.parametrize("name", SERVICES)
def test_each_service_runs_its_module_with_the_launchers_variables(
    compose: dict[str, Any], name: str, tmp_path: Path
) -> None:
    service = compose["services"][name]
    assert service["command"] == ["python", "-m", f"services.{name}"]
    launcher_env = service_env(StackLayout(tmp_path), name, default_ports())
    assert set(service["environment"]) == set(launcher_env)
    public, internal, metrics = default_ports()[name]
    assert service["environment"]["LISTEN_ADDRESS"] == f"0.0.0.0:{public}"
    assert service["environment"]["METRICS_ADDRESS"] == f"0.0.0.0:{metrics}"
    assert service["environment"]["INTERNAL_LISTEN_ADDRESS"] == f"0.0.0.0:{internal}"
    for other in CALLS[name]:
        variable = f"{other.upper()}_INTERNAL_ADDRESS"
        assert service["environment"][variable] == f"{other}:{internal_port(other)}"


@pytest.mark.parametrize("name", SERVICES)
def test_ports_publish_the_public_api_and_keep_the_internal_one_local(
    compose: dict[str, Any], name: str
) -> None:
    published = {_port(p) for p in compose["services"][name]["ports"]}
    public, internal = DEFAULT_PORTS[name], internal_port(name)
    assert published == {("", public, public), ("127.0.0.1", internal, internal)}


@pytest.mark.parametrize("name", SERVICES)
def test_operational_settings(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    assert "container_name" not in service  # so that --scale can work
    assert service["healthcheck"]["test"] == [
        "CMD", "python", "-m", "services.launcher.health", name,
    ]  # fmt: skip
    assert service["stop_grace_period"]
    assert service["mem_limit"]
    assert service["restart"] == "unless-stopped"
    for dependency in service.get("depends_on", {}).values():
        assert dependency == {"condition": "service_healthy"}
    secrets = {s["source"] if isinstance(s, dict) else s for s in service["secrets"]}
    expected = {"ca_cert", f"{name}_tls_cert", f"{name}_tls_key"}
    if name in PERSISTENT:
        expected.add(f"{name}_db_key")
    assert secrets == expected
    for variable in ("TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CA_FILE", "DB_ENCRYPTION_KEY_FILE"):
        if variable in service["environment"]:
            assert service["environment"][variable].startswith("/run/secrets/")


@pytest.mark.parametrize("name", PERSISTENT)
def test_each_persistent_service_has_its_own_named_volume(
    compose: dict[str, Any], name: str
) -> None:
    service = compose["services"][name]
    assert len(service["volumes"]) == 1
    source, target = _volume(service["volumes"][0])
    assert (source, target) == (f"{name}-data", "/data")
    assert service["environment"]["DB_PATH"] == f"/data/{name}.db"
    assert f"{name}-data" in compose["volumes"]


def test_the_relay_is_read_only_with_no_volume(compose: dict[str, Any]) -> None:
    relay = compose["services"]["relay"]
    assert relay["read_only"] is True
    assert "volumes" not in relay
    assert "tmpfs" not in relay


def test_secrets_come_from_the_compose_secrets_folder(compose: dict[str, Any]) -> None:
    for secret in compose["secrets"].values():
        assert Path(secret["file"]).parent == REPO / "var" / "compose-secrets"


def test_make_compose_secrets_creates_every_file_the_compose_file_names(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    layout = StackLayout(tmp_path / "var")
    layout.export_for_compose(tmp_path / "var" / "compose-secrets")
    for secret in compose["secrets"].values():
        name = Path(secret["file"]).name
        copy = tmp_path / "var" / "compose-secrets" / name
        assert copy.is_file(), name
        assert copy.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "var" / "compose-secrets").stat().st_mode & 0o777 == 0o700


def test_the_dockerfile_is_multi_stage_non_root_with_an_exec_form_cmd() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.MULTILINE)) == 2
    user = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert user
    assert user[-1] not in {"root", "0"}
    cmd = re.search(r"^CMD (.+)$", text, re.MULTILINE)
    assert cmd is not None
    assert isinstance(json.loads(cmd.group(1)), list)


def _port(entry: dict[str, Any] | str) -> tuple[str, int, int]:
    """(host address, published, target) from either form docker-compose prints."""
    if isinstance(entry, dict):
        return entry.get("host_ip", ""), int(entry["published"]), int(entry["target"])
    parts = entry.split("/")[0].split(":")
    host = parts[0] if len(parts) == 3 else ""
    return host, int(parts[-2]), int(parts[-1])


def _volume(entry: dict[str, Any] | str) -> tuple[str, str]:
    if isinstance(entry, dict):
        return entry["source"], entry["target"]
    source, target, *_ = entry.split(":")
    return source, target
