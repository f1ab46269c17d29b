"""Fixtures shared by every test directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import redis as redis_support
from tests.support.postgres import PostgresServer, shared_server
from tests.support.redis import RedisServer


@pytest.fixture(scope="session")
def postgres() -> PostgresServer:
    """One private PostgreSQL server for the whole run, started on first use (about a
    second) and deleted at exit; or TEST_POSTGRES_URL's server. Tests take their own
    database and role from it (`postgres.service_database(name)`)."""
    return shared_server()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private Redis for the whole run, hardened as in production (no persistence,
    service ACL users without admin or dangerous commands), started on first use and
    deleted at the end; or TEST_REDIS_URL's server. Tests keep apart by key prefix."""
    with redis_support.running_server() as server:
        yield server


# Markers given by directory: `pytest -m integration` / `-m "not integration"` select by
# where a test lives. (A `pytestmark` in a conftest.py marks nothing.)
_MARKED_DIRECTORIES = {Path(__file__).parent / "integration": pytest.mark.integration}


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for directory, mark in _MARKED_DIRECTORIES.items():
            if directory in item.path.parents:
                item.add_marker(mark)


# Nothing in `make test` may skip: a test that cannot run fails, saying what it needs
# (the tool's install command), so a green run means every test ran.
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = "failed"
    report.longrepr = f"skipped ({reason}), but nothing in make test may skip"
