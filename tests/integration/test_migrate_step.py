"""The one-shot migration step of the compose scale-out (`services.launcher.migrate_all`),
as a process against the run's PostgreSQL: it provisions each service's database and
role, migrates all three with their own keys, can run again, and fails in bounded time,
saying why, when PostgreSQL never answers."""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from services.launcher.topology import PERSISTENT
from tests.support.postgres import PostgresServer
from tests.support.stack import BASE_ENV, REPO, free_port

pytestmark = pytest.mark.integration


def _run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.launcher.migrate_all"],
        env={**BASE_ENV, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _step_env(postgres: PostgresServer, tmp_path: Path, admin_url: str) -> dict[str, str]:
    env = {"POSTGRES_ADMIN_URL": admin_url}
    suffix = secrets.token_hex(4)
    for name in PERSISTENT:
        key = tmp_path / f"{name}.key"
        key.write_text(secrets.token_urlsafe(32))
        url = postgres.url(f"{name}_{suffix}", f"{name}_{suffix}", secrets.token_urlsafe(16))
        env[f"{name.upper()}_DATABASE_URL"] = url
        env[f"{name.upper()}_DB_ENCRYPTION_KEY_FILE"] = str(key)
        env[f"{name.upper()}_KDF_ITERATIONS"] = "100000"
    return env


def test_the_step_provisions_and_migrates_every_service_and_can_run_again(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    env = _step_env(postgres, tmp_path, postgres.admin_url())
    for _ in range(2):  # the second run finds everything done and changes nothing
        result = _run(env)
        assert result.returncode == 0, result.stderr
        for name in PERSISTENT:
            assert f"{name}: database, role, schema and keys are ready" in result.stdout
    for name in PERSISTENT:
        url = env[f"{name.upper()}_DATABASE_URL"]
        with psycopg.connect(url, connect_timeout=5) as conn:  # its own role, its own db
            versions = conn.execute("SELECT count(*) FROM key_versions").fetchone()
            assert versions is not None
            assert versions[0] >= 1


def test_without_postgresql_the_step_fails_in_bounded_time_saying_why(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    env = {**_step_env(postgres, tmp_path, nowhere), "MIGRATE_WAIT_SECONDS": "2"}
    result = _run(env)
    assert result.returncode == 2
    assert "PostgreSQL did not accept connections within 2 s" in result.stderr
