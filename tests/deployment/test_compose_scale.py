"""docker-compose.scale.yml: valid, replicable, and the same stack as `make run-scaled`.

Debian's docker-compose validates and resolves the file (a missing one fails with the
install command). test_compose_scale_stack.py runs it for real (`make compose-test`).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.launcher.proxy import compose_config
from services.launcher.redis_server import hardened_config
from services.launcher.replicas import (
    ON_REDIS,
    local_replica_ports,
    plan,
    replica_overrides,
    scaled_env,
)
from services.launcher.topology import (
    CALLS,
    PERSISTENT,
    SERVICES,
    StackLayout,
    default_ports,
    scale_out_secrets,
    service_env,
)
from services.protocol.ports import internal_port
from tests.deployment.tools import DOCKER_COMPOSE, require

REPO = Path(__file__).resolve().parents[2]
SCALE_FILE = REPO / "docker-compose.scale.yml"
INFRA = {"postgres", "migrate", "redis", "proxy"}
# Variables only `make run-scaled` sets: the SQLite path (unused once DATABASE_URL is
# set; compose containers have no disk to put it on).
LOCAL_ONLY = {"DB_PATH"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    tool = require(DOCKER_COMPOSE)["docker-compose"]
    result = subprocess.run(
        [tool, "--file", str(SCALE_FILE), "config"],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    resolved: dict[str, Any] = yaml.safe_load(result.stdout)
    return resolved


def test_the_file_runs_the_services_with_postgres_redis_migration_and_proxy(
    compose: dict[str, Any],
) -> None:
    assert set(compose["services"]) == {*SERVICES, *INFRA}


@pytest.mark.parametrize("name", sorted({*SERVICES, *INFRA}))
def test_nothing_but_the_proxy_publishes_a_port_so_every_service_scales(
    compose: dict[str, Any], name: str
) -> None:
    service = compose["services"][name]
    assert "container_name" not in service
    if name != "proxy":
        assert not service.get("ports"), name


@pytest.mark.parametrize("name", SERVICES)
def test_each_replica_has_the_variables_of_a_make_run_scaled_replica(
    compose: dict[str, Any], name: str, tmp_path: Path
) -> None:
    """Same variables as `make run-scaled` gives a replica; peers by DNS name (every
    replica's address); state in PostgreSQL and Redis; stateless, read-only containers."""
    service = compose["services"][name]
    replicas = plan(local_replica_ports(2))
    extra = {
        **scaled_env(
            name,
            database_url_file="url",
            redis_url_file="url",
            relay_store_key_file="key",
            trusted_proxies="127.0.0.1",
        ),
        **replica_overrides(replicas[name][0], replicas),
    }
    local = service_env(StackLayout(tmp_path), name, default_ports(), extra=extra)
    assert set(service["environment"]) == set(local) - LOCAL_ONLY
    for other in CALLS[name]:
        address = service["environment"][f"{other.upper()}_INTERNAL_ADDRESS"]
        assert address == f"dns:///{other}:{internal_port(other)}"
    assert service["read_only"] is True
    assert not service.get("volumes")
    assert ("DATABASE_URL_FILE" in service["environment"]) == (name in PERSISTENT)
    assert ("REDIS_URL_FILE" in service["environment"]) == (name in ON_REDIS)
    for variable, value in service["environment"].items():
        if variable.endswith("_FILE"):
            assert value.startswith("/run/secrets/"), variable
    assert service["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}


def test_the_migration_step_is_one_shot_and_waits_for_postgres_itself(
    compose: dict[str, Any],
) -> None:
    migrate = compose["services"]["migrate"]
    assert migrate["command"] == ["python", "-m", "services.launcher.migrate_all"]
    assert migrate["restart"] == "no"
    assert not migrate.get("depends_on")  # see the comment in the file: podman 4.3
    for name in PERSISTENT:
        assert f"{name.upper()}_DATABASE_URL_FILE" in migrate["environment"]
        assert f"{name.upper()}_DB_ENCRYPTION_KEY_FILE" in migrate["environment"]
    postgres = compose["services"]["postgres"]
    assert "pg_isready" in postgres["healthcheck"]["test"]
    assert [
        v["target"] if isinstance(v, dict) else v.split(":")[1] for v in postgres["volumes"]
    ] == ["/var/lib/postgresql/data"]


def test_redis_is_memory_only_read_only_without_a_volume(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert redis["read_only"] is True
    assert not redis.get("volumes")
    assert redis["tmpfs"] == ["/data"]
    assert redis["command"] == ["/run/secrets/redis_conf"]


def test_the_redis_configuration_is_the_hardened_one(tmp_path: Path) -> None:
    files = scale_out_secrets(tmp_path)
    passwords = {user: files[f"redis-{user}.password"] for user in ON_REDIS}
    assert files["redis.conf"] == hardened_config(
        port=6379,
        directory=Path("/data"),
        passwords=passwords,
        bind="0.0.0.0",  # noqa: S104 - inside the compose network
    )
    assert 'save ""' in files["redis.conf"]
    assert "user default off" in files["redis.conf"]
    for user in ON_REDIS:
        assert files[f"{user}.redis-url"].startswith(f"redis://{user}:")


def test_the_proxy_configuration_is_the_one_the_launcher_writes() -> None:
    """deploy/nginx/nginx.conf is what services/launcher/proxy.py writes for compose:
    `python -m services.launcher.proxy > deploy/nginx/nginx.conf` after changing it."""
    assert (REPO / "deploy" / "nginx" / "nginx.conf").read_text() == compose_config()


def test_the_proxy_publishes_make_runs_addresses(compose: dict[str, Any]) -> None:
    proxy = compose["services"]["proxy"]
    published = {_port(p) for p in proxy["ports"]}
    expected = set()
    for name in SERVICES:
        public, internal, _ = default_ports()[name]
        expected |= {("", public, public), ("127.0.0.1", internal, internal)}
    assert published == expected
    (volume,) = proxy["volumes"]
    source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
    assert Path(source) == REPO / "deploy" / "nginx" / "nginx.conf"


def test_make_compose_secrets_creates_every_file_the_scale_file_names(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    layout = StackLayout(tmp_path / "var")
    target = tmp_path / "var" / "compose-secrets"
    layout.export_for_compose(target)
    first = {p.name: p.read_text() for p in target.iterdir()}
    for secret in compose["secrets"].values():
        assert (target / Path(secret["file"]).name).is_file(), secret["file"]
    layout.export_for_compose(target)  # again: PostgreSQL keeps the passwords it was given
    assert {p.name: p.read_text() for p in target.iterdir()} == first


@pytest.mark.parametrize("folder", ["postgres", "redis", "nginx"])
def test_each_image_comes_from_debians_packages_and_runs_unprivileged(folder: str) -> None:
    text = (REPO / "deploy" / folder / "Containerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=debian:", text, re.MULTILINE)
    assert "apt-get install" in text
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users
    assert users[-1] not in {"root", "0"}


def _port(entry: dict[str, Any] | str) -> tuple[str, int, int]:
    if isinstance(entry, dict):
        return entry.get("host_ip", ""), int(entry["published"]), int(entry["target"])
    parts = entry.split("/")[0].split(":")
    host = parts[0] if len(parts) == 3 else ""
    return host, int(parts[-2]), int(parts[-1])
