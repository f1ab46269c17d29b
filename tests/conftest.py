"""Fixtures shared by every test directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.postgres import PostgresServer, running_server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One private PostgreSQL server for the whole run, started on first use (about a
    second) and deleted at the end; or TEST_POSTGRES_URL's server. Tests take their own
    database and role from it (`postgres.service_database(name)`)."""
    with running_server() as server:
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
